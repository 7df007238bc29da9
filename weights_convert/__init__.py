"""weights_convert: official PyTorch checkpoints -> `.pdparams` for the Paddle twins, verified and reported.

    from weights_convert import convert
    report = convert("pspnet", "train_epoch_200.pth", "pspnet.pdparams", report="convert.json")

CLI: `python -m weights_convert MODEL SRC DST [--report R.json] [--partial PREFIX ...] [--overwrite]`
(mounted as `segtwin convert`). See docs/convert.md.
"""
from .convert import ConversionError, ConversionReport, convert
from .keymap import KEYMAPS, KeyAction, plan_conversion, torch_to_paddle_key
from torch_ref.official import CheckpointError, read_checkpoint  # re-exported: the converter's readers

__all__ = ["convert", "ConversionError", "ConversionReport", "read_checkpoint", "CheckpointError", "KEYMAPS",
           "KeyAction", "plan_conversion", "torch_to_paddle_key"]
