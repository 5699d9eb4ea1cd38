"""The `frcnn` command.  Each subcommand is a small function; errors are one clear line."""
import argparse
import sys

import numpy as np


def cmd_anchors(args):
    """Print the k = 9 base anchors and a box-coding round trip (eq. 2)."""
    from .anchors import generate_anchors
    from .box_coding import decode, encode

    anchors = generate_anchors(legacy=args.legacy)
    np.set_printoptions(precision=2, suppress=True)
    print(f"base anchors (base 16, ratios 0.5/1/2, scales 8/16/32, legacy={args.legacy}):")
    print(anchors)
    boxes = np.array([[10, 20, 110, 70], [0, 0, 300, 500]], dtype=np.float32)
    t = encode(boxes, anchors[[0, 4]])
    print("encode(boxes, anchors[[0, 4]]) -> t =")
    print(t)
    back = decode(t, anchors[[0, 4]])
    print("decode(t) ->", back.tolist(), " max error", float(np.abs(back - boxes).max()))
    return 0


def cmd_bench(args):
    from . import bench
    return bench.main(args)


def build_parser():
    p = argparse.ArgumentParser(prog="frcnn", description="Faster R-CNN from scratch")
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("anchors", help="print the base anchors and a box-coding round trip")
    a.add_argument("--legacy", action="store_true", help="the paper code's +1 pixel convention")
    a.set_defaults(func=cmd_anchors)
    b = sub.add_parser("bench", help="time the ops (numpy, triton, torchvision when present)")
    b.add_argument("--repeat", type=int, default=5, help="timed repeats per op (median reported)")
    b.add_argument("--backends", default="numpy,triton,torchvision",
                   help="comma-separated subset of numpy,triton,torchvision")
    b.add_argument("--small", action="store_true", help="small sizes (for the CPU interpreter)")
    b.set_defaults(func=cmd_bench)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, RuntimeError, KeyError) as e:
        print(f"frcnn {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
