"""``python -m paddle_impl.datasets cityscapes|voc DIR [--n N] [--size H,W] [--seed S] [--overwrite]``

Writes a mini synthetic dataset in the official layout (see ``paddle_impl.datasets.synthetic``). Mounted by the
``segtwin`` CLI as ``segtwin synth`` through ``build_parser(subparser)`` + ``run(args)``.
Exit codes: 0 written, 2 usage error (bad arguments, non-empty target without --overwrite).
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from alignment.utils import parse_size, run_parser

from .synthetic import CITIES, write_cityscapes, write_voc

DEFAULT_SIZE = {"cityscapes": (64, 128), "voc": (64, 96)}


def _size_arg(text: str):
    try:
        return parse_size(text, "--size")
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _splits_arg(text: str):
    splits = tuple(s.strip() for s in text.split(",") if s.strip())
    bad = [s for s in splits if s not in CITIES]
    if not splits or bad:
        raise argparse.ArgumentTypeError(f"--splits must be a comma list of {sorted(CITIES)}, got {text!r}")
    return splits


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        v = 0
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return v


def build_parser(parser: Optional[argparse.ArgumentParser] = None) -> argparse.ArgumentParser:
    """Add the synth arguments to ``parser`` (a new one when None) and return it."""
    if parser is None:
        parser = argparse.ArgumentParser(
            prog="python -m paddle_impl.datasets",
            description="Write a mini synthetic dataset in the official Cityscapes / PASCAL VOC 2012 layout.")
    parser.add_argument("dataset", choices=sorted(DEFAULT_SIZE), help="which layout to write")
    parser.add_argument("dir", help="target directory (created; must be empty unless --overwrite)")
    parser.add_argument("--n", type=_positive, default=4, help="images per split (default 4)")
    parser.add_argument("--size", type=_size_arg, default=None, metavar="H,W",
                        help="image size (default cityscapes 64,128; voc 64,96)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--splits", type=_splits_arg, default=("train", "val"), metavar="S1,S2",
                        help="Cityscapes splits to write (default train,val); VOC always writes train/val/trainval")
    parser.add_argument("--overwrite", action="store_true",
                        help="write into a non-empty directory, replacing a previous synthetic dataset there")
    return parser


def run(args: argparse.Namespace) -> int:
    """Write the dataset described by parsed ``args``; print a summary. Returns the exit code."""
    size = args.size or DEFAULT_SIZE[args.dataset]
    try:
        if args.dataset == "cityscapes":
            summary = write_cityscapes(args.dir, n=args.n, size=size, splits=args.splits, seed=args.seed,
                                       overwrite=args.overwrite)
        else:
            summary = write_voc(args.dir, n=args.n, size=size, seed=args.seed, overwrite=args.overwrite)
    except (FileExistsError, NotADirectoryError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    h, w = summary["size"]
    if summary["removed"]:
        print(f"removed {summary['removed']} files of the previous synthetic dataset in {summary['root']}")
    print(f"wrote {summary['dataset']} mini dataset ({summary['files']} files, {h}x{w} HxW, seed {summary['seed']}) "
          f"to {summary['root']}")
    for split, info in summary["splits"].items():
        extra = f" (cities: {', '.join(info['cities'])})" if "cities" in info else ""
        print(f"  {split:9s} {info['images']} images{extra}")
    for key, pattern in summary["layout"].items():
        print(f"  {key:9s} {pattern}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    return run_parser(build_parser(), argv, run)


if __name__ == "__main__":
    sys.exit(main())
