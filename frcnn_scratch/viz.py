"""Matplotlib drawings for the notebooks and the CLI: images, boxes, anchors, RoI bin grids, detections.

Every function draws on an Axes you pass in (`fig, ax = plt.subplots()` in a notebook), except
save_detections, which builds its own Figure with the object-oriented API and writes a PNG. This
module never imports pyplot and never calls show(), so it works headless (servers, CI, MPLBACKEND=Agg).

Coordinates: boxes are continuous xyxy where pixel i covers [i, i + 1); imshow draws pixel i over
[i - 0.5, i + 0.5], so box drawings are shifted by -0.5 to sit on the pixels they cover.
"""
import math

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from . import _checks, roi_align, roi_pool
from ._checks import as_boxes, as_float_array, pair, positive_number

PIXEL = 0.5  # imshow centres pixel i at i: a continuous coordinate x is drawn at x - PIXEL


def class_color(label):
    """A stable colour per class label (matplotlib's tab10 cycle)."""
    return colormaps["tab10"](int(label) % 10)


def show_image(ax, image, extent=None):
    """Show an (H, W, 3) image in [0, 1] (or (H, W) grey) without axis ticks; returns the AxesImage.

    Args:
        ax: matplotlib Axes.
        image: (H, W, 3) or (H, W) float array; values are clipped to [0, 1].
        extent: matplotlib's (left, right, bottom, top); default: pixel i centred on i.
    """
    image = as_float_array(image, "image")
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (1, 3)):
        raise ValueError(f"image: expected shape (H, W, 3) or (H, W), got {image.shape}")
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    shown = ax.imshow(np.clip(image, 0.0, 1.0), cmap="gray" if image.ndim == 2 else None,
                      vmin=0.0, vmax=1.0, interpolation="nearest", extent=extent)
    ax.set_axis_off()
    return shown


def _box_text(label, score, class_names):
    name = None
    if label is not None:
        name = class_names[label - 1] if class_names is not None and 1 <= label <= len(class_names) \
            else str(label)
    if score is None:
        return name
    return f"{name} {score:.2f}" if name is not None else f"{score:.2f}"


def draw_boxes(ax, boxes, labels=None, scores=None, class_names=None, color=None, linewidth=1.5,
               linestyle="-", fontsize=7):
    """Draw boxes as rectangles, each with a "name 0.93" caption when labels / scores are given.

    Args:
        ax: matplotlib Axes (on top of show_image, or alone).
        boxes: (N, 4) xyxy in image coordinates.
        labels: optional (N,) ints in 1..C; picks the caption name and, without `color`, the colour.
        scores: optional (N,) floats shown with two decimals.
        class_names: optional names in label order (label = index + 1); without it the label number.
        color: one matplotlib colour for every box; None = a colour per class.
        linewidth, linestyle, fontsize: drawing style.
    Returns:
        list of the Rectangle patches added.
    """
    boxes = as_boxes(boxes, "boxes")
    n = len(boxes)
    if labels is not None:
        labels = np.asarray(labels).astype(np.int64).reshape(-1)
        if labels.shape != (n,):
            raise ValueError(f"labels: expected shape ({n},) to match boxes, got {labels.shape}")
    if scores is not None:
        scores = as_float_array(scores, "scores", ndim=1)
        if scores.shape != (n,):
            raise ValueError(f"scores: expected shape ({n},) to match boxes, got {scores.shape}")
    patches = []
    for i, (x1, y1, x2, y2) in enumerate(boxes.tolist()):
        label = None if labels is None else int(labels[i])
        score = None if scores is None else float(scores[i])
        c = color if color is not None else class_color(label if label is not None else 0)
        rect = Rectangle((x1 - PIXEL, y1 - PIXEL), x2 - x1, y2 - y1, fill=False, edgecolor=c,
                         linewidth=linewidth, linestyle=linestyle)
        ax.add_patch(rect)
        patches.append(rect)
        text = _box_text(label, score, class_names)
        if text:
            ax.text(x1 - PIXEL, y1 - PIXEL, text, fontsize=fontsize, color="white", va="bottom",
                    bbox=dict(facecolor=c, edgecolor="none", pad=1, alpha=0.8))
    return patches


def draw_anchors(ax, anchors, color=None, max_anchors=None, linewidth=1.0, show_centers=True):
    """Draw anchor boxes (e.g. the k = 9 base anchors, or those at one feature-map position).

    Args:
        ax: matplotlib Axes.
        anchors: (A, 4) xyxy anchors.
        color: one colour for all; None = a colour per anchor (cycled), which separates the shapes.
        max_anchors: draw only the first this many (anchors come in (y, x, a) order).
        linewidth: line width.
        show_centers: mark each anchor's centre with a dot.
    Returns:
        list of the Rectangle patches added.
    """
    anchors = as_boxes(anchors, "anchors")
    if max_anchors is not None:
        anchors = anchors[:int(max_anchors)]
    patches = []
    for i, (x1, y1, x2, y2) in enumerate(anchors.tolist()):
        c = color if color is not None else class_color(i)
        rect = Rectangle((x1 - PIXEL, y1 - PIXEL), x2 - x1, y2 - y1, fill=False, edgecolor=c,
                         linewidth=linewidth)
        ax.add_patch(rect)
        patches.append(rect)
        if show_centers:
            ax.plot([(x1 + x2) / 2 - PIXEL], [(y1 + y2) / 2 - PIXEL], ".", color=c, markersize=3)
    if len(anchors):
        ax.update_datalim(np.stack([anchors[:, :2], anchors[:, 2:]]).reshape(-1, 2) - PIXEL)
        ax.autoscale_view()
    return patches


def roi_bins(roi, output_size, spatial_scale, mode="align", aligned=False, map_size=None):
    """The bin rectangles of one RoI on the feature map, in feature-map index coordinates.

    In index coordinates (torchvision's) feature cell j has its centre at j; imshow(feature_map)
    draws cell j over [j - 0.5, j + 0.5], so these rectangles overlay such an image directly.
    The geometry is the ops' own, not a copy of it:

    mode="align" (RoI Align): roi_align.roi_geometry's start and bin size, bin i spanning
        start + i * bin .. start + (i + 1) * bin (continuous, in float32 as the op computes them).
    mode="pool" (RoI max pooling): roi_pool.bin_cells, the cells each bin takes the max over
        (corners rounded half away from zero, bins clipped to the map), drawn as the union of
        those cells, [first - 0.5, last + 0.5]; neighbouring bins may share a cell.

    Args:
        roi: (4,) x1, y1, x2, y2 or (5,) batch index first, in image coordinates.
        output_size: int or (ph, pw).
        spatial_scale: feature-map size / image size (1 / stride).
        mode: "align" or "pool".
        aligned: RoI Align's half-pixel shift.
        map_size: (H, W) of the feature map: RoI pool's bins are clipped to it (None: only at 0).
    Returns:
        (ph, pw, 4) float32 bins as xyxy in index coordinates.
    """
    roi = as_float_array(roi, "roi", ndim=1)
    if roi.shape[0] not in (4, 5):
        raise ValueError(f"roi: expected shape (4,) or (5,), got {roi.shape}")
    if mode not in ("align", "pool"):
        raise ValueError(f"mode: expected 'align' or 'pool', got {mode!r}")
    rois = np.concatenate([[0.0], roi[-4:]]).astype(np.float32)[None]      # (1, 5), image 0
    ph, pw = pair(output_size)
    s = positive_number(spatial_scale, "spatial_scale")
    if mode == "align":
        _, (y0, bin_h, _), (x0, bin_w, _) = roi_align.roi_geometry(rois, s, (ph, pw), 1, aligned)
        xs = x0[0] + np.arange(pw + 1, dtype=np.float32) * bin_w[0]     # (pw + 1,) bin edges
        ys = y0[0] + np.arange(ph + 1, dtype=np.float32) * bin_h[0]     # (ph + 1,)
        x_lo, x_hi, y_lo, y_hi = xs[:-1], xs[1:], ys[:-1], ys[1:]
    else:
        _, (row_lo, row_hi), (col_lo, col_hi) = roi_pool.bin_cells(rois, (ph, pw), s, map_size)
        x_lo, x_hi = col_lo[0] - 0.5, col_hi[0] - 0.5                   # cells c0 .. c1 - 1
        y_lo, y_hi = row_lo[0] - 0.5, row_hi[0] - 0.5
    bins = np.zeros((ph, pw, 4), np.float32)
    bins[..., 0], bins[..., 2] = x_lo[None, :], x_hi[None, :]
    bins[..., 1], bins[..., 3] = y_lo[:, None], y_hi[:, None]
    return bins


def align_samples(roi, output_size, spatial_scale, sampling_ratio=-1, aligned=False):
    """RoI Align's bilinear sampling points of one RoI (roi_align's own sample_coordinates).

    Args:
        roi, output_size, spatial_scale, aligned: as in roi_bins.
        sampling_ratio: samples per bin side; <= 0 adaptive, ceil(bin size), as the op counts.
    Returns:
        xs, ys: (ph, pw, Gy, Gx) float32 each, the points of bin (i, j) in index coordinates.
    """
    roi = as_float_array(roi, "roi", ndim=1)
    if roi.shape[0] not in (4, 5):
        raise ValueError(f"roi: expected shape (4,) or (5,), got {roi.shape}")
    rois = np.concatenate([[0.0], roi[-4:]]).astype(np.float32)[None]      # (1, 5), image 0
    ph, pw = pair(output_size)
    ratio = _checks.sampling_ratio(sampling_ratio)
    _, y_axis, x_axis = roi_align.roi_geometry(rois, positive_number(spatial_scale, "spatial_scale"),
                                               (ph, pw), ratio, aligned)
    ys, _ = roi_align.sample_coordinates(*y_axis, ph)                   # (1, ph, Gy)
    xs, _ = roi_align.sample_coordinates(*x_axis, pw)                   # (1, pw, Gx)
    shape = (ph, pw, ys.shape[2], xs.shape[2])
    return (np.broadcast_to(xs[0][None, :, None, :], shape),
            np.broadcast_to(ys[0][:, None, :, None], shape))


def draw_roi_grid(ax, roi, output_size, spatial_scale, mode="align", aligned=False, sampling_ratio=0,
                  color="yellow", cell_color="0.6", map_size=None):
    """Draw a RoI's bin grid over a feature map shown with ax.imshow(feature_map) (index coordinates).

    Draws the feature cells around the RoI (thin lines at half-integers), the bins (see roi_bins),
    and for mode="align" the bilinear sampling points (see align_samples): sampling_ratio per
    bin side, or adaptive ceil(bin size) when sampling_ratio <= 0.

    Args:
        ax: matplotlib Axes.
        roi: (4,) or (5,) RoI in image coordinates.
        output_size: int or (ph, pw).
        spatial_scale: 1 / stride.
        mode: "align" or "pool".
        aligned: RoI Align's half-pixel shift.
        sampling_ratio: RoI Align samples per bin side (<= 0 adaptive).
        color, cell_color: colours of the bins and of the cell lines.
        map_size: (H, W) of the map, to clip RoI pool's bins as the op does (see roi_bins).
    Returns:
        (ph, pw, 4) bins that were drawn.
    """
    bins = roi_bins(roi, output_size, spatial_scale, mode, aligned, map_size)
    lo = np.floor(bins[..., :2].min(axis=(0, 1))) - 1.5       # (2,) x, y of the cell lines to draw
    hi = np.ceil(bins[..., 2:].max(axis=(0, 1))) + 1.5
    for x in np.arange(lo[0], hi[0] + 1e-6):
        ax.plot([x, x], [lo[1], hi[1]], color=cell_color, linewidth=0.5)
    for y in np.arange(lo[1], hi[1] + 1e-6):
        ax.plot([lo[0], hi[0]], [y, y], color=cell_color, linewidth=0.5)
    for x1, y1, x2, y2 in bins.reshape(-1, 4).tolist():
        ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=color, linewidth=1.2))
    if mode == "align":
        xs, ys = align_samples(roi, output_size, spatial_scale, sampling_ratio, aligned)
        ax.plot(xs.ravel(), ys.ravel(), ".", color=color, markersize=3)
    ax.set_xlim(lo[0], hi[0])
    ax.set_ylim(hi[1], lo[1])                                     # image orientation: y down
    ax.set_aspect("equal")
    return bins


# The picture save_detections writes: about 4 output pixels per image pixel for small images, and
# never more than this many pixels on its longer side, so that a camera photo (6000 x 4000) is
# drawn from a reduced copy and the drawing costs a few tens of MB, not gigabytes.
MAX_PICTURE_SIDE = 1600


def save_detections(path, image, detections, class_names, gt=None, score_threshold=0.0, title=None,
                    dpi=100):
    """Write a PNG of an image with its detections (solid, coloured per class) and optional gts (dashed).

    Args:
        path: output file (.png).
        image: (H, W, 3) float in [0, 1].
        detections: dict(boxes (D, 4), scores (D,), labels (D,)), e.g. FasterRCNN.predict's output.
        class_names: names in label order.
        gt: optional dict(boxes (G, 4), labels (G,)) (a sample works), drawn white and dashed.
        score_threshold: hide detections scoring below it.
        title: optional title.
        dpi: resolution; the picture has about 4 output pixels per image pixel, its longer side at
            most MAX_PICTURE_SIDE (a larger image is drawn reduced; boxes are in its own pixels).
    Returns:
        path.
    """
    from PIL import Image
    image = as_float_array(image, "image", ndim=3)
    height, width = image.shape[:2]
    longest = max(width, height)
    side = min(4 * longest, MAX_PICTURE_SIDE)                     # output pixels, longer side
    fig = Figure(figsize=(width * side / longest / dpi, height * side / longest / dpi), dpi=dpi)
    canvas = FigureCanvasAgg(fig)
    fig.patch.set_alpha(0.0)                                      # boxes on a transparent layer
    ax = fig.add_axes((0, 0, 1, 1))                               # in image coordinates
    ax.patch.set_visible(False)
    ax.set_axis_off()
    if gt is not None:
        draw_boxes(ax, gt["boxes"], gt.get("labels"), class_names=class_names, color="white",
                   linestyle="--", linewidth=1.0)
    boxes = as_boxes(detections["boxes"], "detections['boxes']")
    scores = as_float_array(detections["scores"], "detections['scores']", ndim=1)
    keep = scores >= score_threshold
    draw_boxes(ax, boxes[keep], np.asarray(detections["labels"])[keep], scores[keep], class_names)
    if title:                                       # inside the image: the axes fill the figure
        ax.text(0.01, 0.99, title, transform=ax.transAxes, fontsize=8, color="white", va="top",
                bbox=dict(facecolor="black", edgecolor="none", pad=1, alpha=0.6))
    ax.set_xlim(-0.5, width - 0.5)
    ax.set_ylim(height - 0.5, -0.5)
    canvas.draw()
    overlay = Image.frombuffer("RGBA", canvas.get_width_height(), canvas.buffer_rgba(), "raw",
                               "RGBA", 0, 1)
    # The photo's pixels are scaled to the layer's size in 8 bits (nearest when enlarging, so
    # pixels stay square; bilinear when reducing) and the boxes laid over them: matplotlib never
    # holds the image, whose resampling would cost float64 copies of a large one.
    picture = Image.fromarray(np.round(np.clip(image, 0.0, 1.0) * 255).astype(np.uint8))
    picture = picture.resize(overlay.size, Image.NEAREST if side >= longest else Image.BILINEAR)
    picture = picture.convert("RGBA")
    picture.alpha_composite(overlay)
    picture.convert("RGB").save(path, format="PNG")
    return path


def save_pr_curves(path, result, class_names, dpi=100):
    """Write a PNG with one precision-recall panel per class: the VOC curve at IoU 0.5 (detections
    ranked by score) with its AP, and the class's COCO AP@[.5:.95] in the title.

    Args:
        path: output file (.png).
        result: train.score's dict (pr, ap, npos; coco.ap_per_class).
        class_names: names in label order.
    Returns:
        path.
    """
    n = max(len(class_names), 1)
    cols = min(4, n)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(3.0 * cols, 2.8 * rows), dpi=dpi)
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.ravel()[n:]:
        ax.set_axis_off()
    coco_ap = result.get("coco", {}).get("ap_per_class", {})
    for label, (ax, name) in enumerate(zip(axes.ravel(), class_names), start=1):
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("recall", fontsize=8)
        ax.set_ylabel("precision", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if label not in result["pr"]:
            ax.set_title(f"{name}: no objects", fontsize=9)
            continue
        recall, precision = result["pr"][label]
        ax.plot(np.concatenate([[0], recall]), np.concatenate([[1], precision]), color=class_color(label))
        title = f"{name}: AP50 {result['ap'][label]:.3f}"
        if label in coco_ap:
            title += f", AP {coco_ap[label]:.3f}"
        ax.set_title(f"{title}\n({result['npos'][label]} objects)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi, format="png")
    return path
