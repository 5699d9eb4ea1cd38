"""viz: drawings land where the boxes are, files are real PNGs, nothing needs a display."""
import numpy as np
import pytest
from matplotlib.figure import Figure

from frcnn_scratch.anchors import generate_anchors
from frcnn_scratch.data.shapes import SHAPE_CLASSES, make_shapes_dataset
from frcnn_scratch.viz import draw_anchors, draw_boxes, draw_roi_grid, roi_bins, save_detections, show_image


def new_ax():
    return Figure().add_subplot()


def test_draw_boxes_places_rectangles_and_captions():
    ax = new_ax()
    show_image(ax, np.zeros((20, 30, 3), np.float32))
    patches = draw_boxes(ax, [[2, 3, 12, 8]], labels=[3], scores=[0.934], class_names=SHAPE_CLASSES)
    (rect,) = patches
    # continuous box [2, 12) is drawn over imshow's pixel cells 2..11, i.e. from 1.5 to 11.5
    assert rect.get_xy() == (1.5, 2.5) and rect.get_width() == 10 and rect.get_height() == 5
    assert [t.get_text() for t in ax.texts] == ["triangle 0.93"]
    ax2 = new_ax()
    draw_boxes(ax2, [[0, 0, 1, 1], [1, 1, 2, 2]], labels=[1, 7])            # no names: the number
    assert [t.get_text() for t in ax2.texts] == ["1", "7"]
    assert draw_boxes(new_ax(), np.zeros((0, 4))) == []
    with pytest.raises(ValueError, match="labels"):
        draw_boxes(new_ax(), [[0, 0, 1, 1]], labels=[1, 2])
    with pytest.raises(ValueError, match="image"):
        show_image(new_ax(), np.zeros((4, 4, 2)))


def test_draw_anchors_draws_each_one():
    ax = new_ax()
    assert len(draw_anchors(ax, generate_anchors())) == 9
    assert len(draw_anchors(new_ax(), generate_anchors(), max_anchors=3)) == 3


def test_roi_bins_hand_cases():
    # RoI Align, not aligned: image box (0, 0, 32, 16) at scale 1/8 -> feature box (0, 0, 4, 2), 2 x 2 bins
    bins = roi_bins([0, 0, 32, 16], 2, 1 / 8)
    np.testing.assert_array_equal(bins, [[[0, 0, 2, 1], [2, 0, 4, 1]], [[0, 1, 2, 2], [2, 1, 4, 2]]])
    # aligned shifts by half a cell
    np.testing.assert_array_equal(roi_bins([0, 0, 32, 16], 1, 1 / 8, aligned=True),
                                  [[[-0.5, -0.5, 3.5, 1.5]]])
    # RoI pool: corners 0.5 * 3 = 1.5 -> 2 (half away from zero), 4.5 * 3 -> 13.5 -> 14; width 13 cells,
    # 2 bins of 6.5: cells 2..8 and 8..14 (overlapping at cell 8), drawn from c - 0.5
    pool = roi_bins([0.5, 0, 4.5, 0], (1, 2), 3, mode="pool")
    np.testing.assert_array_equal(pool[0, :, 0], [1.5, 7.5])
    np.testing.assert_array_equal(pool[0, :, 2], [8.5, 14.5])
    np.testing.assert_array_equal(pool[0, :, [1, 3]], [[-0.5, -0.5], [0.5, 0.5]])
    with pytest.raises(ValueError, match="mode"):
        roi_bins([0, 0, 1, 1], 2, 1.0, mode="warp")


def test_draw_roi_grid_adds_bins_and_sampling_points():
    ax = new_ax()
    ax.imshow(np.zeros((6, 8)))
    bins = draw_roi_grid(ax, [0, 8, 16, 56, 40], (2, 3), 1 / 8, sampling_ratio=2)
    assert bins.shape == (2, 3, 4) and len(ax.patches) == 6
    points = [line for line in ax.lines if line.get_marker() == "."]
    assert len(points) == 1 and len(points[0].get_xdata()) == 2 * 3 * 2 * 2
    # RoI pool: corners round to cells x 1..7, y 2..5 (7 x 4 cells); bins of 3.5 x 2 cells cover
    # cells floor(j * 3.5) .. ceil((j + 1) * 3.5) - 1 (x: 1..4 and 4..7; y: 2..3 and 4..5), drawn
    # as index ranges [c - 0.5, c + 0.5]; no sampling points
    ax = new_ax()
    bins = draw_roi_grid(ax, [8, 16, 56, 40], 2, 1 / 8, mode="pool")
    np.testing.assert_array_equal(bins, [[[0.5, 1.5, 4.5, 3.5], [3.5, 1.5, 7.5, 3.5]],
                                         [[0.5, 3.5, 4.5, 5.5], [3.5, 3.5, 7.5, 5.5]]])
    assert len(ax.patches) == 4 and not [line for line in ax.lines if line.get_marker() == "."]


def test_save_detections_writes_a_png(tmp_path):
    s = make_shapes_dataset(1, seed=0)[0]
    dets = dict(boxes=s["boxes"], scores=np.linspace(0.9, 0.5, len(s["boxes"])), labels=s["labels"])
    path = tmp_path / "det.png"
    assert save_detections(path, s["image"], dets, SHAPE_CLASSES, gt=s, title="seed 0") == path
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000, f"{len(data)} bytes, not a PNG"
    from PIL import Image
    with Image.open(path) as im:
        w, h = im.size
    assert abs(w / h - s["image"].shape[1] / s["image"].shape[0]) < 0.05, "aspect ratio not kept"


# ---- the drawings use the ops' own geometry --------------------------------------------------

def test_roi_pool_bins_round_as_the_op_does():
    """At scale 0.7, x = 45 is 31.499999999999996 in float64 (rounds to 31) and 31.5 in float32,
    as RoI pooling computes it (rounds to 32): the drawn bin starts where the op's bin starts."""
    bins = roi_bins([45, 0, 60, 0], 1, 0.7, mode="pool")
    assert bins[0, 0, 0] == 31.5 and bins[0, 0, 2] == 42.5     # cells 32 .. 42


@pytest.mark.parametrize("seed", range(4))
def test_roi_pool_bins_hold_the_ops_maxima(seed):
    """On a map whose values rise in row-major order, each bin's maximum is its last cell, and on
    one whose values fall, its first: the corners of the drawn bins (clipped to the map)."""
    from frcnn_scratch import ops
    rng = np.random.default_rng(seed)
    H, W = 9, 11
    rising = np.arange(H * W, dtype=np.float32).reshape(1, 1, H, W)
    xy = rng.uniform(-10, 60, 2)
    roi = np.concatenate([[0], xy, xy + rng.uniform(0, 40, 2)]).astype(np.float32)
    for values, corner in ((rising, "last"), (-rising, "first")):
        _, argmax = ops.roi_pool(values, roi[None], (3, 2), 0.2)
        bins = roi_bins(roi, (3, 2), 0.2, mode="pool", map_size=(H, W))
        for i in range(3):
            for j in range(2):
                x1, y1, x2, y2 = bins[i, j] + 0.5                       # cells x1 .. x2 - 1
                if argmax[0, 0, i, j] < 0:
                    assert x2 <= x1 or y2 <= y1, (i, j, bins[i, j])     # an empty bin: nothing drawn
                    continue
                want = (y2 - 1) * W + x2 - 1 if corner == "last" else y1 * W + x1
                assert argmax[0, 0, i, j] == want, (corner, i, j, bins[i, j])


@pytest.mark.parametrize("aligned, ratio", [(False, 2), (True, 3), (True, -1)])
def test_align_samples_are_the_ops_samples(aligned, ratio):
    """On a map F[h, w] = w, RoI Align reads each sample's own x (bilinear interpolation of a
    linear map, inside it): each bin's output is the mean x of the drawn samples."""
    from frcnn_scratch import ops
    from frcnn_scratch.viz import align_samples
    H, W = 12, 16
    features = np.broadcast_to(np.arange(W, dtype=np.float32), (1, 1, H, W)).copy()
    roi = np.array([0, 9, 7, 41, 33], np.float32)                    # well inside, at scale 1/4
    out = ops.roi_align(features, roi[None], (2, 3), 0.25, ratio, aligned)
    xs, ys = align_samples(roi, (2, 3), 0.25, ratio, aligned)
    np.testing.assert_allclose(out[0, 0], xs.mean(axis=(2, 3)), rtol=1e-6)
    bins = roi_bins(roi, (2, 3), 0.25, aligned=aligned)
    assert ((xs >= bins[..., 0:1, None]) & (xs <= bins[..., 2:3, None])).all()
    assert ((ys >= bins[..., 1:2, None]) & (ys <= bins[..., 3:4, None])).all()
