"""``segtwin infer`` / ``python -m paddle_impl.engine.infer``: run an exported model with ``paddle.inference``.

    python -m paddle_impl.engine.infer --model out/pspnet --image PATH|DIR --out DIR [--flip] [--scales ...]

The exported graph has a fixed H x W, so images go through sliding windows of exactly that size (images smaller
than a window are padded with the mean, as in ``segtwin eval --slide``); one window when the sizes match.
Normalisation and palette come from PREFIX.deploy.json (written by ``segtwin export``), else semseg's defaults.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional

import numpy as np

from custom_ops.build import BuildUnavailable

from . import _cli

PROG = "segtwin infer"


class ExportedModel:
    """Callable like a Paddle model on (N, C, H, W) tensors of the exported size; runs the paddle.inference
    predictor one image at a time (the exported batch size may be 1)."""

    def __init__(self, prefix, threads=None, custom_ops=False):
        from .exporter import create_predictor
        self.predictor = create_predictor(prefix, threads=threads, custom_ops=custom_ops)

    def eval(self):
        return self

    def __call__(self, x):
        import paddle

        from .exporter import infer
        arr = x.numpy() if hasattr(x, "numpy") else np.asarray(x)
        outs = [infer(None, arr[i:i + 1], predictor=self.predictor) for i in range(arr.shape[0])]
        return paddle.to_tensor(np.concatenate(outs, 0))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Predict images with an exported model (paddle.inference, "
                                "oneDNN off on CPU).")
    p.add_argument("--model", required=True, help="export prefix (PREFIX.json/.pdmodel + PREFIX.pdiparams)")
    p.add_argument("--image", required=True, nargs="+")
    p.add_argument("--out", required=True)
    p.add_argument("--palette", default=None, help="cityscapes or voc (default: deploy.json, else voc)")
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--flip", action="store_true")
    p.add_argument("--scales", type=float, nargs="+", default=[1.0])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        from ..transforms import SEMSEG_MEAN, SEMSEG_STD
        from .exporter import model_files
        from .predictor import predict

        graph, _ = model_files(args.model)
        prefix = graph.rsplit(".", 1)[0]
        deploy = {}
        if os.path.isfile(prefix + ".deploy.json"):
            with open(prefix + ".deploy.json") as f:
                deploy = json.load(f)
        norm = deploy.get("normalize", {})
        normalize = (tuple(norm.get("mean", SEMSEG_MEAN)), tuple(norm.get("std", SEMSEG_STD)),
                     bool(norm.get("to_bgr", False)))
        if deploy.get("model_options"):  # the attention path was fixed when the graph was traced (segtwin export)
            print(f"segtwin: {deploy.get('model_type', 'the model')} exported graph uses "
                  + "; ".join(f"{k}={v}" for k, v in deploy["model_options"].items()), file=sys.stderr)
        model = ExportedModel(prefix, threads=args.threads, custom_ops=bool(deploy.get("custom_ops")))
        shape = deploy.get("input_shape")
        if shape is None:
            shape = list(model.predictor.get_input_handle(model.predictor.get_input_names()[0]).shape())
        crop = (int(shape[2]), int(shape[3]))
        if min(crop) <= 0:
            raise ValueError(f"{graph}: the exported input shape {shape} is not fixed; re-export with --input-size")
        palette = args.palette or deploy.get("palette", "voc")
        res = predict(model, args.image, args.out, palette, alpha=args.alpha, normalize=normalize, mode="slide",
                      crop=crop, flip=args.flip, scales=tuple(args.scales), size_rule=None,
                      progress=not args.no_progress)
        print(f"{len(res)} image(s) -> {args.out}")
    except (OSError, ValueError, KeyError, BuildUnavailable) as e:
        # BuildUnavailable: the graph holds segtwin's custom ops and this machine can neither build nor load them
        return _cli.fail(PROG, e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
