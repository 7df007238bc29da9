"""Command line: `python -m weights_convert MODEL SRC DST ...` (mounted by the lead as `segtwin convert`).

Exit status: 0 converted and verified; 2 the checkpoint does not fit (ConversionError), cannot be read or is refused
(CheckpointError), or the written file fails the strict reload (StateDictMismatch) -- one line on stderr, no
traceback; 1 anything unexpected (with its traceback).

Mounting in another CLI:
    sub = subparsers.add_parser("convert", help="...")
    build_parser(sub)          # sets func=run
    args = top.parse_args(); sys.exit(args.func(args))
"""
from __future__ import annotations

import argparse
import sys
import traceback
from typing import Optional, Sequence

from alignment.specs import model_names

__all__ = ["build_parser", "main", "run"]


def build_parser(parser: Optional[argparse.ArgumentParser] = None) -> argparse.ArgumentParser:
    """Add the convert arguments to `parser` (a new one when None) and set `func=run`."""
    if parser is None:
        parser = argparse.ArgumentParser(
            prog="python -m weights_convert",
            description="Convert an official PyTorch checkpoint into a .pdparams for the Paddle twin, verify it with "
                        "a strict reload and report every key.")
    parser.add_argument("model", choices=model_names(), help="model name")
    parser.add_argument("src", help="official checkpoint: .pth / .pth.tar / .pt (torch.load weights_only) or a "
                                    "detectron2 .pkl")
    parser.add_argument("dst", help="output .pdparams (never overwritten without --overwrite)")
    parser.add_argument("--report", metavar="R.json", default=None,
                        help="write the per-key JSON report here (also on a key mismatch)")
    parser.add_argument("--partial", metavar="PREFIX", nargs="+", action="extend", default=[],
                        help="the checkpoint only covers twin keys under these prefixes (alias 'backbone' = the "
                             "ResNet stages); other twin keys keep their initialisation. Put it after DST")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing DST")
    parser.add_argument("--num-classes", type=int, default=None, metavar="N",
                        help="class count of the model (default: read off the checkpoint)")
    parser.add_argument("--cfg", action="append", default=[], metavar="KEY=VALUE",
                        help="model config, repeatable; wins over what the checkpoint implies (e.g. --cfg psa_type=0 "
                             "--cfg mask_size=7,11 for a single-branch, non-square semseg PSANet)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)
    return parser


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


def run(args: argparse.Namespace) -> int:
    """Run a parsed `convert` command; returns the exit status."""
    from .convert import ConversionError, _import_paddle, convert

    _import_paddle()  # quietly, and without touching the root logger
    from paddle_impl.checkpoint import StateDictMismatch
    from alignment.specs import parse_cfg_items
    from torch_ref.official import CheckpointError

    try:
        cfg = parse_cfg_items(args.cfg)
    except ValueError as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 2
    if args.num_classes is not None:
        cfg["num_classes"] = args.num_classes
    try:
        rep = convert(args.model, args.src, args.dst, partial=tuple(args.partial), report=args.report, cfg=cfg,
                      overwrite=args.overwrite, progress=False if args.no_progress else "auto")
    except (ConversionError, CheckpointError, StateDictMismatch) as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        if args.report and getattr(e, "report", None) is not None:
            print(f"report: {args.report}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; nothing written", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - a bug: show everything
        traceback.print_exc()
        print(f"error: unexpected {type(e).__name__}: {_one_line(e)}", file=sys.stderr)
        return 1
    counts = rep.summary
    order = ["copy", "rename", "transpose", "fill", "drop", "keep-init"]
    parts = [f"{a} {counts[a]}" for a in order if counts.get(a)]
    mem = rep.memory.get("peak_delta_over_checkpoint")
    print(f"{rep.model}: {sum(counts.values())} keys ({', '.join(parts)}), cfg {rep.cfg}"
          + (f", partial {', '.join(rep.partial)}" if rep.partial else ""))
    print(f"wrote {rep.dst} (verified by a strict reload into the Paddle twin) in {rep.seconds:.1f} s"
          + (f", peak RSS +{rep.memory['peak_rss_delta_bytes'] / 2**20:.0f} MiB = {mem:.2f} x checkpoint"
             if mem is not None else ""))
    if args.report:
        print(f"report: {args.report}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse: --help (0) or a usage error (2)
        return int(e.code or 0)
    return args.func(args)
