"""`segtwin train` / `python -m paddle_impl.train`: train a Paddle twin from a YAML config.

    python -m paddle_impl.train --config paddle_impl/configs/pspnet_r50_cityscapes.yml --data-root data/cityscapes
    python -m paddle_impl.train --config CFG --save-dir output/psp --resume            # continue from output/psp/latest
    python -m paddle.distributed.launch --nproc_per_node=2 paddle_impl/train.py --config CFG   # multi-process

(``paddle.distributed.launch`` runs a script path or an executable, not ``-m module``: this file therefore also
runs as a script.)

See docs/training.md.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

if __name__ == "__main__" and not __package__:  # run as a script (paddle.distributed.launch paddle_impl/train.py)
    _here = os.path.dirname(os.path.abspath(__file__))
    if sys.path and os.path.abspath(sys.path[0] or ".") == _here:
        sys.path[0] = os.path.dirname(_here)  # never let paddle_impl/'s modules shadow top-level ones
    else:
        sys.path.insert(0, os.path.dirname(_here))
    import importlib
    importlib.import_module("paddle_impl")
    __package__ = "paddle_impl"


from .engine._cli import add_opts_argument  # noqa: E402 - after the script-mode path fix above


def build_parser(parser: Optional[argparse.ArgumentParser] = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(prog="segtwin train", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="YAML config (paddle_impl/configs/*.yml)")
    p.add_argument("--resume", nargs="?", const="latest", default=None, metavar="PATH",
                   help="continue training: from SAVE_DIR/latest without PATH, else from PATH (a checkpoint "
                        "directory iter_N, or a save dir holding a 'latest' file)")
    p.add_argument("--data-root", default=None, help="replaces dataset_root of train_dataset and val_dataset")
    p.add_argument("--iters", type=int, default=None, help="override iters (the lr schedule follows)")
    p.add_argument("--save-dir", default=None,
                   help="checkpoints and logs (default: the config's save_dir, else output/<config name>)")
    p.add_argument("--seed", type=int, default=None, help="override seed")
    p.add_argument("--batch-size", type=int, default=None, help="override batch_size (per process)")
    p.add_argument("--num-workers", type=int, default=None, help="override num_workers")
    p.add_argument("--overwrite", action="store_true",
                   help="the save dir holds an earlier run: delete its checkpoints, best model and log, start again "
                        "(without it, such a save dir is refused unless --resume)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    add_opts_argument(p)
    return p


def run(args: argparse.Namespace) -> int:
    from .config import ConfigError, load_config, parse_opts
    from .engine.trainer import DataWorkerDied, Trainer, TrainingDiverged

    flags = {"iters": args.iters, "seed": args.seed, "batch_size": args.batch_size, "num_workers": args.num_workers}
    try:
        overrides = dict(parse_opts(args.opts), **{k: v for k, v in flags.items() if v is not None})
        cfg = load_config(args.config, overrides)
        save_dir = args.save_dir or cfg.raw.get("save_dir") or os.path.join(
            "output", os.path.splitext(os.path.basename(args.config))[0])
        if args.resume and args.overwrite:
            raise ConfigError("--resume and --overwrite exclude each other")
        result = Trainer(cfg, save_dir, resume=args.resume, data_root=args.data_root,
                         progress=not args.no_progress, overwrite=args.overwrite).train()
    except (TrainingDiverged, DataWorkerDied) as e:  # the job's own failure
        print(f"segtwin train: error: {_one_line(e)}", file=sys.stderr)
        return 1
    except (ConfigError, OSError, ValueError, KeyError) as e:  # bad input: config, data, weights, run dir
        print(f"segtwin train: error: {_one_line(e)}", file=sys.stderr)
        return 2
    if result["rank"] != 0:
        return 0
    print(f"segtwin train: done at iteration {result['iteration']}; best mIoU {result['best_miou']:.4f} "
          f"(iter {result['best_iter']}); checkpoints in {save_dir}", file=sys.stderr)
    return 0


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e.args[0] if isinstance(e, KeyError) and e.args else e).split())
    return text or type(e).__name__


def main(argv: Optional[List[str]] = None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
