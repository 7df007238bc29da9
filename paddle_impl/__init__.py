"""paddle_impl: the PaddlePaddle twins of torch_ref (same files, classes, attribute names, statement order).

    import paddle_impl
    model = paddle_impl.build_model("pspnet", num_classes=19)
    model = paddle_impl.load_pdparams("pspnet", "pspnet.pdparams")   # strict: every key, every shape

`MODELS` has the same keys and cfg keys as `torch_ref.MODELS`.
"""
from __future__ import annotations

from .models import danet, psanet, pspnet

MODELS = {
    "pspnet": pspnet.build,
    "psanet": psanet.build,
    "danet": danet.build,
}

CONFIG_FROM_WEIGHTS = {
    "pspnet": pspnet.infer_config,
    "psanet": psanet.infer_config,
    "danet": danet.infer_config,
}


def _check_name(name: str) -> None:
    if name not in MODELS:
        raise KeyError(f"unknown model {name!r}; registered: {', '.join(sorted(MODELS))}")


def build_model(name: str, **cfg):
    """Build the Paddle twin `name` (a paddle.nn.Layer) with random weights. Same cfg keys as torch_ref."""
    _check_name(name)
    return MODELS[name](**cfg)


def config_from_weights(name: str, state_dict) -> dict:
    _check_name(name)
    try:
        return CONFIG_FROM_WEIGHTS[name](state_dict)
    except KeyError as e:
        raise KeyError(f"{name}: cannot infer the model config from the weights: key {e} is missing") from None


def load_pdparams(name: str, path, **cfg):
    """Build `name` and load a `.pdparams` strictly (see `checkpoint.strict_load`). Returns the model in eval mode."""
    import paddle

    from .checkpoint import strict_load

    state_dict = paddle.load(str(path))
    full_cfg = config_from_weights(name, state_dict)
    full_cfg.update(cfg)
    model = build_model(name, **full_cfg)
    strict_load(model, state_dict, source=str(path))
    model.eval()
    return model
