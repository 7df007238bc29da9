"""Export a Paddle model to a static inference model and run it with ``paddle.inference``.

    from paddle_impl.engine.exporter import export, infer
    files = export(model, "out/pspnet", (1, 3, 513, 513))      # -> out/pspnet.json (or .pdmodel) + .pdiparams
    logits = infer("out/pspnet", images)                        # images N x 3 x H x W float32 (normalised)

Paddle 3 (PIR) writes ``PREFIX.json`` + ``PREFIX.pdiparams``; older Paddle (or FLAGS_enable_pir_api=0) writes
``PREFIX.pdmodel`` + ``PREFIX.pdiparams``; ``infer`` takes either. The exported graph has a FIXED input shape
(models with a size rule such as PSPNet's (H-1)%8 == 0 check it at trace time); export once per size you serve.

On CPU ``infer`` runs with oneDNN disabled: with oneDNN on, Paddle 3.3.1 cannot run the exported ``interpolate``
(see docs/evaluation.md, "Export and inference"). Models using the PSA custom ops (``psa_mask``, and PSANet's
fused ``psa_attend``: one library registers both) need ``paddle_impl.ops.psa_mask.load_op()`` in the process that
loads them (``infer`` calls it when ``custom_ops=True``). The ``psa_attend`` kernel is CPU only: a graph holding it
runs on a CPU predictor.
"""
from __future__ import annotations

import os
from collections import Counter
from typing import Optional, Sequence, Tuple

import numpy as np

__all__ = ["export", "infer", "model_files", "create_predictor", "program_op_types", "custom_ops_in"]

#: The prefix Paddle gives the ops of a custom-op library in a saved program (``custom_op.psa_attend``).
CUSTOM_OP_PREFIX = "custom_op."


def model_files(prefix) -> Tuple[str, str]:
    """(graph file, params file) of an exported model: PREFIX.json or PREFIX.pdmodel, and PREFIX.pdiparams."""
    prefix = os.fspath(prefix)
    for ext in (".json", ".pdmodel"):
        if prefix.endswith(ext):
            prefix = prefix[: -len(ext)]
    if prefix.endswith(".pdiparams"):
        prefix = prefix[: -len(".pdiparams")]
    graph = next((prefix + e for e in (".json", ".pdmodel") if os.path.isfile(prefix + e)), None)
    params = prefix + ".pdiparams"
    if graph is None or not os.path.isfile(params):
        raise FileNotFoundError(f"no exported model at {prefix}: expected {prefix}.json (Paddle 3) or "
                                f"{prefix}.pdmodel, and {params}")
    return graph, params


def export(model, out_prefix, input_shape: Sequence[int], *, check: bool = True) -> dict:
    """Trace ``model`` (eval mode) with ``paddle.jit.to_static`` for a fixed float32 input of ``input_shape``
    (N, C, H, W) and save it with ``paddle.jit.save``. Returns {"model": graph path, "params": path, "input_shape"}.
    ``check``: run the model's size rule (``check_input``) first, for a clear error before tracing.
    """
    import paddle
    from paddle.static import InputSpec

    shape = [int(v) for v in input_shape]
    if len(shape) != 4 or any(v <= 0 for v in shape):
        raise ValueError(f"input_shape must be (N, C, H, W) of positive integers, got {tuple(input_shape)}")
    rule = getattr(type(model), "check_input", None)
    if check and callable(rule):
        rule(shape[2], shape[3])
    out_prefix = os.fspath(out_prefix)
    os.makedirs(os.path.dirname(os.path.abspath(out_prefix)), exist_ok=True)
    model.eval()
    static = paddle.jit.to_static(model, input_spec=[InputSpec(shape, "float32", "x")], full_graph=True)
    paddle.jit.save(static, out_prefix)
    graph, params = model_files(out_prefix)
    return {"model": graph, "params": params, "input_shape": shape}


def program_op_types(model_prefix) -> Counter:
    """{op type: count} of an exported model's program, read back with ``paddle.static.load_inference_model`` (the
    custom ops it holds must be registered in this process: ``segtwin export`` has just run them)."""
    import paddle

    was_dynamic = paddle.in_dynamic_mode()
    paddle.enable_static()
    try:
        program, _, _ = paddle.static.load_inference_model(os.fspath(model_prefix),
                                                           paddle.static.Executor(paddle.CPUPlace()))
        return Counter(op.name() for op in program.global_block().ops)
    finally:
        if was_dynamic:
            paddle.disable_static()


def custom_ops_in(op_types) -> list:
    """The segtwin custom ops (``psa_mask``, ``psa_attend``) among ``program_op_types``, sorted by name."""
    return sorted(name[len(CUSTOM_OP_PREFIX):] for name, n in op_types.items()
                  if n and name.startswith(CUSTOM_OP_PREFIX))


def create_predictor(model_prefix, *, use_gpu: bool = False, threads: Optional[int] = None,
                     custom_ops: bool = False):
    """A ``paddle.inference`` predictor for an exported model (oneDNN off on CPU)."""
    from paddle import inference

    graph, params = model_files(model_prefix)
    if custom_ops:
        from custom_ops.build import BuildUnavailable

        from ..ops.psa_mask import load_op
        try:
            load_op()
        except BuildUnavailable as e:
            raise BuildUnavailable(f"{graph} holds segtwin's custom ops (psa_mask / psa_attend), which cannot be "
                                   f"loaded here: {e.reason}") from e
    config = inference.Config(graph, params)
    if use_gpu:
        config.enable_use_gpu(256, 0)
    else:
        config.disable_gpu()
        config.disable_mkldnn()  # Paddle 3.3.1's oneDNN path fails on the exported interpolate
        if threads:
            config.set_cpu_math_library_num_threads(int(threads))
    config.disable_glog_info()
    return inference.create_predictor(config)


def infer(model_prefix, images, *, use_gpu: bool = False, threads: Optional[int] = None, custom_ops: bool = False,
          predictor=None) -> np.ndarray:
    """Run the exported model on ``images`` (N, C, H, W float32, already normalised, the exported shape) and return
    its first output as numpy (logits (N, K, H, W) for the segmentation models)."""
    images = np.ascontiguousarray(np.asarray(images, dtype=np.float32))
    if images.ndim != 4:
        raise ValueError(f"images must be N x C x H x W, got shape {images.shape}")
    pred = predictor or create_predictor(model_prefix, use_gpu=use_gpu, threads=threads, custom_ops=custom_ops)
    names = pred.get_input_names()
    h = pred.get_input_handle(names[0])
    h.reshape(list(images.shape))
    h.copy_from_cpu(images)
    pred.run()
    out = pred.get_output_handle(pred.get_output_names()[0])
    return out.copy_to_cpu()
