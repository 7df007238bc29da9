"""``segtwin eval`` / ``python -m paddle_impl.engine.evaluate``: mIoU & co. of a Paddle model on a config's val set.

    python -m paddle_impl.engine.evaluate --config paddle_impl/configs/pspnet_r50_cityscapes.yml \\
        --weights output/best_model/model.pdparams [--data-root DIR] [--flip] [--scales 0.75 1 1.25] \\
        [--slide 713 0] [--protocol danet] [--ms] [--out result.json]
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional

from . import _cli

PROG = "segtwin eval"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Evaluate a Paddle segmentation model on the config's val set "
                                "(semseg test semantics: softmax averaged over flips / scales / windows; or "
                                "--protocol danet). "
                                "Test-time options default to the config's test_config section.")
    p.add_argument("--config", required=True, help="YAML config (model and val_dataset)")
    p.add_argument("--weights", default=None, help=".pdparams or a checkpoint directory (default: model.pretrained "
                   "or random weights)")
    p.add_argument("--data-root", default=None, help="replaces val_dataset.dataset_root")
    p.add_argument("--out", default=None, help="write the result (metrics, per-class lists, confusion matrix) as JSON")
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N images only")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", action="store_true", help="print the JSON result instead of the table")
    _cli.add_test_options(p)
    _cli.add_opts_argument(p)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        _cli.set_threads(args.threads)
        from .evaluator import evaluate, format_table, save_json

        cfg = _cli.load_cfg(args.config, args.data_root, args.opts)
        test_kw = _cli.test_kwargs(args, cfg)  # before building anything: a bad option fails fast
        model = _cli.build_model(cfg, args.weights)
        dataset = cfg.build_dataset("val", root=args.data_root)
        result = evaluate(model, dataset, cfg.num_classes, ignore_index=cfg.ignore_index,
                          normalize=_cli.normalize_from_config(cfg), progress=not args.no_progress,
                          limit=args.limit, **test_kw)
        result["config"] = args.config
        result["weights"] = args.weights
        if args.out:
            save_json(result, args.out)
        if args.json:
            print(json.dumps(result))
        else:
            print(format_table(result, result["class_names"]))
            if args.out:
                print(f"result written to {args.out}")
    except (OSError, ValueError, KeyError) as e:
        return _cli.fail(PROG, e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
