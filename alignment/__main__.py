"""`segtwin align` / `python -m alignment`: align Paddle twins against their torch references.

Exit codes: 0 every step of every model passed; 1 a step failed (the verdict and report say which, and the first
divergent module is printed on stderr); 2 bad arguments or inputs.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence


def build_parser(parser: Optional[argparse.ArgumentParser] = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(prog="segtwin align", description=__doc__,
                                          formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", help="model name (e.g. pspnet); omit with --all, or with --config (its "
                                            "model.type)")
    p.add_argument("--all", action="store_true", help="align every registered model")
    p.add_argument("--weights", help="official upstream checkpoint (.pth/.pth.tar); default: random weights saved "
                                     "in the official format")
    p.add_argument("--data", help="dataset root. With --config: the batch is the first one `segtwin train` would "
                                  "read (the config's training pipeline, augmentation included, seeded; N from "
                                  "--input-size, the crop from the config or --opts). Without: Cityscapes or VOC val "
                                  "images resized to --input-size")
    p.add_argument("--out", default="segtwin_out", help="artifact directory (default: %(default)s)")
    p.add_argument("--input-size", default=None, help="N,C,H,W of the batch (default: the model spec's align_input, "
                                                       "2,3,65,65 for the shipped models)")
    p.add_argument("--config", help="training config (segtwin train --config): the loss, schedule and backward "
                                    "steps run ITS recipe (optimizer, parameter groups, lr schedule, loss) through "
                                    "the trainer's builders, and its model keys build the twins; default: the "
                                    "model's official recipe config (paddle_impl/configs/)")
    p.add_argument("--opts", nargs="+", default=[], metavar="KEY=VALUE",
                   help="overrides of the config, dotted keys (e.g. --opts optimizer.weight_decay=0 "
                        "lr_scheduler.warmup_iters=100)")
    p.add_argument("--iters", type=int, default=3, help="training iterations of the backward step (default: 3)")
    p.add_argument("--steps", default="forward,loss,schedule,backward,metric",
                   help="comma-separated subset of forward,loss,schedule,backward,metric")
    p.add_argument("--num-classes", type=int, help="class count (default: from the checkpoint, the dataset, or 19)")
    p.add_argument("--cfg", action="append", default=[], metavar="KEY=VALUE",
                   help="model config for both twins, repeatable (e.g. --cfg psa_type=0 --cfg mask_size=59 "
                        "--cfg psa_impl=tensor)")
    p.add_argument("--torch-cfg", action="append", default=[], metavar="KEY=VALUE",
                   help="model config for the torch side only, on top of --cfg: cross-implementation alignment, "
                        "e.g. --paddle-cfg psa_impl=fused against the torch reference path")
    p.add_argument("--paddle-cfg", action="append", default=[], metavar="KEY=VALUE",
                   help="model config for the Paddle side only, on top of --cfg (see --torch-cfg)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="CPU threads for BOTH frameworks (default: $OMP_NUM_THREADS or 4)")
    p.add_argument("--free-run", action="store_true", help="backward step without lockstep: rounding differences "
                                                           "compound over iterations (see README)")
    p.add_argument("--no-trace", action="store_true", help="skip the per-layer trace (no layer plot)")
    p.add_argument("--full-artifacts", action="store_true", help="store every element of large tensors in the "
                                                                 ".npy/.npz files (default: strided sample)")
    p.add_argument("--keep-weights", action="store_true", help="keep the random official .pth and the converted "
                                                               ".pdparams in OUT/MODEL/weights/ (default: deleted "
                                                               "after the run; their SHA-256 is in verdict.json)")
    p.add_argument("--json", action="store_true", help="print the verdict(s) as JSON on stdout")
    p.set_defaults(func=main_from_args)
    return p


def main_from_args(args) -> int:
    from .logutil import get_logger
    from .runner import AlignmentSetupError, human_bytes, parse_model_cfg, run
    from .specs import model_names

    log = get_logger("segtwin.align")

    if args.config and not args.model and not args.all:
        try:
            from paddle_impl.config import ConfigError, load_config, parse_opts
            args.model = load_config(args.config, parse_opts(args.opts)).model_type
        except (ConfigError, FileNotFoundError, ValueError) as e:
            log.error("--config %s: %s", args.config, e)
            return 2
    if args.all == bool(args.model):
        log.error("give a model name or --all (registered: %s)", ", ".join(model_names()))
        return 2
    if args.all and args.config:
        log.error("--config belongs to one model; use it without --all")
        return 2
    if args.all and args.weights:
        log.error("--weights belongs to one model; use it without --all")
        return 2
    models = model_names() if args.all else [args.model]
    try:
        model_cfg = parse_model_cfg(args.cfg)
        side_cfg = {"torch": parse_model_cfg(args.torch_cfg), "paddle": parse_model_cfg(args.paddle_cfg)}
    except AlignmentSetupError as e:
        log.error("%s", e)
        return 2
    verdicts = []
    for name in models:
        try:
            v = run(name, weights=args.weights, out=args.out, data=args.data, input_size=args.input_size,
                    iters=args.iters, steps=[s.strip() for s in args.steps.split(",") if s.strip()],
                    seed=args.seed, num_classes=args.num_classes, threads=args.threads, trace=not args.no_trace,
                    lockstep=not args.free_run, model_cfg=model_cfg, full_artifacts=args.full_artifacts,
                    keep_weights=args.keep_weights, config=args.config, opts=args.opts, side_cfg=side_cfg)
        except (AlignmentSetupError, FileNotFoundError, KeyError) as e:
            log.error("%s: %s", name, e.args[0] if e.args else e)
            return 2
        except Exception as e:  # converter / reader errors carry their own one-line messages
            from weights_convert import CheckpointError, ConversionError
            if isinstance(e, (CheckpointError, ConversionError)):
                log.error("%s: %s", name, e)
                return 2
            raise
        verdicts.append(v)
        steps = ", ".join(f"{s} {'ok' if r['passed'] else 'FAIL'}" for s, r in v["steps"].items())
        print(f"{name}: {'PASS' if v['passed'] else 'FAIL'} ({steps}) in {v['seconds']} s -> {v['out_dir']}/"
              f"report.md ({human_bytes(v['artifacts_bytes'])} on disk)", file=sys.stderr)
    if args.json:
        print(json.dumps(verdicts if args.all else verdicts[0], indent=2, default=str))
    return 0 if all(v["passed"] for v in verdicts) else 1


def main(argv: Optional[Sequence[str]] = None) -> int:
    import warnings
    warnings.filterwarnings("ignore", message="No ccache found")
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
