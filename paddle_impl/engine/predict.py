"""``segtwin predict`` / ``python -m paddle_impl.engine.predict``: pseudo-colour label PNGs and overlays.

    python -m paddle_impl.engine.predict --config CFG --weights W --image PATH|DIR [...] --out DIR [--flip] ...
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from . import _cli

PROG = "segtwin predict"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Predict images with a Paddle segmentation model: OUT/NAME.png "
                                "(palette PNG of the class indices) and OUT/NAME_overlay.jpg.")
    p.add_argument("--config", required=True)
    p.add_argument("--weights", default=None)
    p.add_argument("--image", required=True, nargs="+", help="image files and/or directories")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--palette", default=None, help="cityscapes or voc (default: from the config's dataset type)")
    p.add_argument("--alpha", type=float, default=0.5, help="overlay opacity of the colours (default 0.5)")
    p.add_argument("--overlay-ext", default=".jpg", choices=[".jpg", ".png"])
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    _cli.add_test_options(p)
    _cli.add_opts_argument(p)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        _cli.set_threads(args.threads)
        from .predictor import predict

        cfg = _cli.load_cfg(args.config, opts=args.opts)
        model = _cli.build_model(cfg, args.weights)
        palette = args.palette or _cli.palette_name(_cli.dataset_type(cfg))
        res = predict(model, args.image, args.out, palette, alpha=args.alpha, overlay_ext=args.overlay_ext,
                      normalize=_cli.normalize_from_config(cfg), progress=not args.no_progress,
                      **_cli.test_kwargs(args, cfg))
        print(f"{len(res)} image(s) -> {args.out}")
    except (OSError, ValueError, KeyError) as e:
        return _cli.fail(PROG, e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
