"""alignment: prove, step by step, that a Paddle twin computes what its torch reference computes.

    import alignment
    verdict = alignment.run("pspnet", out="segtwin_out")        # forward, loss, backward, metric + trace
    r = alignment.compare(paddle_array, torch_array, key="logits")  # the comparison core
    spec = alignment.specs.get_spec("pspnet")                        # one spec per model
    verdict = alignment.align_models(torch_net, paddle_net, (x, y), loss=(tl, pl), copy_weights=True)  # any port
    assert verdict["passed"], verdict["steps"]

Importing this package does not import torch or paddle; `run` does.
"""
from .compare import AlignmentError, CompareResult, assert_aligned, compare  # noqa: F401
from .policy import Policy, PolicyError, Tolerance  # noqa: F401
from . import specs  # noqa: F401  (the model spec table; imports no framework)


def run(name, **kwargs):
    """Align model `name`; see `alignment.runner.run` for the arguments. Returns the verdict dict."""
    from .runner import run as _run
    return _run(name, **kwargs)


def align_models(torch_model, paddle_model, batch, **kwargs):
    """Align any pair of models (a user's own port); see `alignment.any_port.align_models` and
    docs/align-your-model.md. Returns the verdict dict."""
    from .any_port import align_models as _align_models
    return _align_models(torch_model, paddle_model, batch, **kwargs)
