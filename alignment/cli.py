"""The `segtwin` command: one entry point, one subcommand per job (each also runnable as `python -m <package>`).

  segtwin align MODEL | --all       = python -m alignment             compare a Paddle twin with its torch reference
  segtwin convert MODEL SRC DST     = python -m weights_convert       official .pth -> .pdparams (strict, reported)
  segtwin synth cityscapes|voc DIR  = python -m paddle_impl.datasets  write a mini dataset in the official layout
  segtwin data check --config CFG [--data-root DIR] = python -m paddle_impl.datasets.check check ...
  segtwin train --config CFG        = python -m paddle_impl.train     train a Paddle twin (single or multi-GPU/CPU)
  segtwin eval --config CFG --weights W    = python -m paddle_impl.engine.evaluate   whole / flip / ms / sliding
  segtwin predict --config CFG --weights W --image P --out D = python -m paddle_impl.engine.predict
  segtwin export --config CFG --weights W --out PREFIX       = python -m paddle_impl.engine.export
  segtwin infer --model PREFIX --image P --out D             = python -m paddle_impl.engine.infer
  segtwin x2paddle MODEL|module:factory = python -m alignment.x2paddle_port   check X2Paddle's conversion of a model

`segtwin COMMAND --help` shows the options of each.
"""
from __future__ import annotations

import importlib
import sys
import warnings
from typing import Optional, Sequence

COMMANDS = {
    "align": "alignment.__main__",
    "convert": "weights_convert.__main__",
    "synth": "paddle_impl.datasets.__main__",
    "data": "paddle_impl.datasets.check",
    "train": "paddle_impl.train",
    "eval": "paddle_impl.engine.evaluate",
    "predict": "paddle_impl.engine.predict",
    "export": "paddle_impl.engine.export",
    "infer": "paddle_impl.engine.infer",
    "x2paddle": "alignment.x2paddle_port",
}


def main(argv: Optional[Sequence[str]] = None) -> int:
    warnings.filterwarnings("ignore", message="No ccache found")
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        print(f"segtwin: unknown command {cmd!r}; choose from {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[cmd])
    sys.argv[0] = f"segtwin {cmd}"
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
