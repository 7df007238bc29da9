"""torch_ref: PyTorch reference twins that load the OFFICIAL upstream checkpoints unchanged.

    import torch_ref
    model = torch_ref.build_model("pspnet", num_classes=19)           # random init (semseg's init)
    model = torch_ref.load_official("pspnet", "train_epoch_200.pth")  # semseg checkpoint, strict=True

`MODELS` maps a model name to its builder; `paddle_impl.MODELS` has the same keys and the same cfg keys.
"""
from __future__ import annotations

from .models import danet, psanet, pspnet

MODELS = {
    "pspnet": pspnet.build,
    "psanet": psanet.build,
    "danet": danet.build,
}

# name -> function(state_dict) -> cfg read off an official checkpoint (class count, depth, ...)
CONFIG_FROM_WEIGHTS = {
    "pspnet": pspnet.infer_config,
    "psanet": psanet.infer_config,
    "danet": danet.infer_config,
}


def _check_name(name: str) -> None:
    if name not in MODELS:
        raise KeyError(f"unknown model {name!r}; registered: {', '.join(sorted(MODELS))}")


def build_model(name: str, **cfg):
    """Build the reference model `name` (a torch.nn.Module) with random weights. cfg: e.g. num_classes, layers."""
    _check_name(name)
    return MODELS[name](**cfg)


def config_from_weights(name: str, state_dict) -> dict:
    """cfg (num_classes, depth, ...) that an official state_dict implies; KeyError names a missing key."""
    _check_name(name)
    try:
        return CONFIG_FROM_WEIGHTS[name](state_dict)
    except KeyError as e:
        raise KeyError(f"{name}: cannot infer the model config from the checkpoint: key {e} is missing") from None


def drop_ignored_keys(name: str, state_dict, source: str = "<state_dict>"):
    """state_dict without the keys the model's explicit ignore rule matches; warns with every dropped key."""
    import warnings

    from weights_convert.keymap import get_keymap

    keymap = get_keymap(name)
    reasons = {k: keymap.ignore_reason(k) for k in state_dict}
    dropped = {k: why for k, why in reasons.items() if why is not None}
    if not dropped:
        return state_dict
    lines = "; ".join(f"{k}: {why}" for k, why in dropped.items())
    warnings.warn(f"{source}: {len(dropped)} key(s) ignored by the {name} rule -- {lines}", stacklevel=3)
    return {k: v for k, v in state_dict.items() if k not in dropped}


def load_official(name: str, path, **cfg):
    """Build `name` and load an official checkpoint with strict=True.

    The file is read with `torch.load(weights_only=True)` (it never runs code); `state_dict`/`model` containers are
    unwrapped and `module.` prefixes stripped -- the only normalisations -- and keys matched by the model's explicit
    ignore rule (`weights_convert.keymap.KEYMAPS[name].ignored`, e.g. an old DANet checkpoint's `pretrained.fc.*`)
    are dropped with a warning that lists them. cfg values not given (num_classes, depth) come from the checkpoint.
    Returns the model in eval mode.
    """
    from weights_convert.readers import read_checkpoint

    state_dict, _info = read_checkpoint(path)
    state_dict = drop_ignored_keys(name, state_dict, source=str(path))
    full_cfg = config_from_weights(name, state_dict)
    full_cfg.update(cfg)
    model = build_model(name, **full_cfg)
    model.load_state_dict(state_dict, strict=True)
    return model.eval()
