"""paddle_impl: the PaddlePaddle twins of torch_ref (same files, classes, attribute names, statement order).

    import paddle_impl
    model = paddle_impl.build_model("pspnet", num_classes=19)
    model = paddle_impl.load_pdparams("pspnet", "pspnet.pdparams")   # strict: every key, every shape

Which models exist, and every fact about them, comes from the spec table (`alignment.specs.SPECS`).
"""
from __future__ import annotations

from alignment.specs import get_spec, model_names  # noqa: F401  (model_names re-exported)


def build_model(name: str, **cfg):
    """Build the Paddle twin `name` (a paddle.nn.Layer) with random weights. Same cfg keys as torch_ref."""
    return get_spec(name).build("paddle", **cfg)


def config_from_weights(name: str, state_dict, given=None) -> dict:
    """cfg a twin state_dict (.pdparams) implies, `given` winning."""
    return get_spec(name).infer_config(state_dict, given, framework="paddle")


def load_pdparams(name: str, path, **cfg):
    """Build `name` and load a `.pdparams` strictly (see `checkpoint.strict_load`). Returns the model in eval mode."""
    from .checkpoint import read_state_file, strict_load

    state_dict = read_state_file(path)
    model = build_model(name, **config_from_weights(name, state_dict, cfg))
    strict_load(model, state_dict, source=str(path))
    model.eval()
    return model
