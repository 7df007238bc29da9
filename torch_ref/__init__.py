"""torch_ref: PyTorch reference twins that load the OFFICIAL upstream checkpoints unchanged.

    import torch_ref
    model = torch_ref.build_model("pspnet", num_classes=19)           # random init (semseg's init)
    model = torch_ref.load_official("pspnet", "train_epoch_200.pth")  # semseg checkpoint, strict=True

Which models exist, and every fact about them, comes from the spec table (`alignment.specs.SPECS`); the official
checkpoint formats are read and written by `torch_ref.official`. torch_ref never imports the converter.
"""
from __future__ import annotations

from alignment.specs import get_spec, model_names  # noqa: F401  (model_names re-exported)


def build_model(name: str, **cfg):
    """Build the reference model `name` (a torch.nn.Module) with random weights. cfg: e.g. num_classes, layers."""
    return get_spec(name).build("torch", **cfg)


def config_from_weights(name: str, state_dict, given=None) -> dict:
    """cfg (num_classes, depth, ...) an official state_dict implies, `given` winning; KeyError names a missing key,
    `alignment.specs.ConfigInferenceError` the `--cfg` option a value needs."""
    return get_spec(name).infer_config(state_dict, given)


def drop_ignored_keys(name: str, state_dict, source: str = "<state_dict>"):
    """state_dict without the keys the model's explicit ignore rule (spec `ignored_keys`) matches; warns with every
    dropped key."""
    import re
    import warnings

    rules = get_spec(name).ignored_keys
    dropped = {}
    for k in state_dict:
        why = next((reason for pattern, reason in rules if re.fullmatch(pattern, k)), None)
        if why is not None:
            dropped[k] = why
    if not dropped:
        return state_dict
    lines = "; ".join(f"{k}: {why}" for k, why in dropped.items())
    warnings.warn(f"{source}: {len(dropped)} key(s) ignored by the {name} rule -- {lines}", stacklevel=3)
    return {k: v for k, v in state_dict.items() if k not in dropped}


def load_official(name: str, path, **cfg):
    """Build `name` and load an official checkpoint with strict=True.

    The file is read with `torch.load(weights_only=True)` (it never runs code); `state_dict`/`model` containers are
    unwrapped and `module.` prefixes stripped -- the only normalisations -- and keys matched by the model's explicit
    ignore rule (spec `ignored_keys`, e.g. an old DANet checkpoint's `pretrained.fc.*`) are dropped with a warning
    that lists them. cfg values given win; the others (num_classes, depth, ...) are read off the checkpoint.
    Returns the model in eval mode.
    """
    from .official import read_checkpoint

    state_dict, _info = read_checkpoint(path)
    state_dict = drop_ignored_keys(name, state_dict, source=str(path))
    model = build_model(name, **config_from_weights(name, state_dict, cfg))
    model.load_state_dict(state_dict, strict=True)
    return model.eval()
