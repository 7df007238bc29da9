"""``segtwin export`` / ``python -m paddle_impl.engine.export``: static inference model for ``paddle.inference``.

    python -m paddle_impl.engine.export --config CFG --weights W --out out/pspnet [--input-size 1,3,513,513]

Writes PREFIX.json (Paddle 3; .pdmodel with older Paddle) + PREFIX.pdiparams + PREFIX.deploy.json (input shape,
normalisation, palette, class count, the custom ops the saved graph holds (read back from it: ``[]``, or e.g.
``["psa_attend"]``; ``segtwin infer`` loads the op library when the list is not empty), the attention options the
model was traced with: what ``segtwin infer`` needs). The model is built as ``segtwin eval`` builds it
(``_cli.build_model``): PSANet's fused PSA aggregation (the ``psa_attend`` custom op in the graph) and DANet's
efficient PAM unless the config sets ``model.psa_impl`` / ``model.pam_impl``.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional

from custom_ops.build import BuildUnavailable

from . import _cli

PROG = "segtwin export"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Export a Paddle segmentation model (fixed input shape).")
    p.add_argument("--config", required=True)
    p.add_argument("--weights", default=None)
    p.add_argument("--out", required=True, help="output prefix, e.g. out/pspnet")
    p.add_argument("--input-size", default="1,3,513,513", help="N,C,H,W of the exported graph (default 1,3,513,513;"
                   " PSPNet needs (H-1)%%8 == 0)")
    _cli.add_opts_argument(p)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        from alignment.utils import parse_size

        from .exporter import custom_ops_in, export, program_op_types

        shape = parse_size(args.input_size, "--input-size", "NCHW")
        cfg = _cli.load_cfg(args.config, opts=args.opts)
        model = _cli.build_model(cfg, args.weights)
        files = export(model, args.out, shape)
        # from the saved graph, not the model's spec: PSANet's compact mode, for one, holds no PSA op
        custom_ops = custom_ops_in(program_op_types(args.out))
        mean, std, to_bgr = _cli.normalize_from_config(cfg)
        deploy = {"model_type": cfg.model_type, "num_classes": cfg.num_classes, "input_shape": list(shape),
                  "normalize": {"mean": list(mean), "std": list(std), "to_bgr": to_bgr},
                  "palette": _cli.palette_name(_cli.dataset_type(cfg)),
                  "custom_ops": custom_ops, "model": files["model"], "params": files["params"],
                  "model_options": _cli.chosen_values(_cli.inference_options(cfg))}
        with open(args.out + ".deploy.json", "w") as f:
            json.dump(deploy, f, indent=1)
        print(f"exported {files['model']} + {files['params']} (input {'x'.join(map(str, shape))})")
    except (OSError, ValueError, KeyError, BuildUnavailable) as e:
        # BuildUnavailable: the graph holds segtwin's custom ops and this machine can neither build nor load them
        return _cli.fail(PROG, e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
