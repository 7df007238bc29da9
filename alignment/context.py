"""Shared state of one alignment run: both models, the shared batch, the policy, and the key/name mapping.

Keys are always TORCH names (`layer0.1.running_mean`); the Paddle side is read through the converter's own rename
(`weights_convert.keymap.torch_to_paddle_key`), so both sides' artifacts carry identical key sets.
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

from .compare import CompareResult
from .policy import Policy

class TrainRecipe:
    """The training recipe both sides run: a `paddle_impl.config.Config` (the file `segtwin train` reads, or the
    model's official recipe config). The Paddle side is built by the Config's own methods -- the calls the trainer
    makes -- and the torch side by the twins in torch_ref from the same config sections."""

    def __init__(self, config, name: str):
        self.config = config
        self.name = name
        self.source = config.path
        self.resolved = config.recipe

    @property
    def base_lr(self) -> float:
        return float(self.resolved["lr_scheduler"]["learning_rate"])

    @property
    def iters(self) -> int:
        return int(self.resolved["iters"])

    def paddle_optimizer(self, model):
        return self.config.build_optimizer(model)

    def torch_optimizer(self, model):
        import torch_ref.optim as toptim

        from .specs import get_spec
        return toptim.build_optimizer(model, self.resolved["optimizer"], self.base_lr,
                                      get_spec(self.name).head_prefixes)

    def paddle_schedule(self, iters: int = None):
        return self.config.build_lr(iters)

    def torch_schedule(self, iters: int = None):
        import torch_ref.schedule as tschedule
        return tschedule.build_schedule(self.config.raw["lr_scheduler"], int(iters or self.iters))

    def paddle_loss(self):
        return self.config.build_loss()

    def torch_loss(self):
        import torch_ref.losses as tlosses
        return tlosses.build_loss(self.name, self.config.raw.get("loss"), self.config.ignore_index,
                                  self.config.raw.get("model"))


def module_path_of(key: str) -> str:
    """'iter1/grad/layer2.0.conv1.weight' -> 'layer2.0.conv1'; 'loss/main' -> 'loss.main'."""
    tail = key.split("/")[-1]
    if "/" in key and key.split("/")[-2] in ("grad", "param", "buffer"):
        return tail.rsplit(".", 1)[0]
    return key.replace("/", ".")


def seed_everything(seed: int) -> None:
    import paddle
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    paddle.seed(seed)


def determinism_flags() -> Dict[str, Any]:
    """Switch off non-determinism and TF32 on both sides; returns what was set (recorded in verdict.json)."""
    import paddle
    import torch

    os.environ.setdefault("NVIDIA_TF32_OVERRIDE", "0")
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    flags = {"FLAGS_cudnn_deterministic": True}
    try:
        paddle.set_flags(flags)
    except Exception:  # pragma: no cover - flag absent in a build
        flags = {}
    return {
        "NVIDIA_TF32_OVERRIDE": os.environ.get("NVIDIA_TF32_OVERRIDE"),
        "torch.backends.cudnn.deterministic": True,
        "torch.backends.cuda.matmul.allow_tf32": False,
        "torch.backends.cudnn.allow_tf32": False,
        **{k: v for k, v in flags.items()},
    }


def disable_dropout(model) -> int:
    """Set p=0 on every dropout layer (torch or Paddle); returns how many were changed."""
    n = 0
    for m in (model.modules() if hasattr(model, "modules") else model.sublayers()):
        if type(m).__name__.lower().startswith("dropout") and hasattr(m, "p"):
            m.p = 0.0
            n += 1
    return n


def torch_state(model) -> Dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


def paddle_state(model) -> Dict[str, np.ndarray]:
    return {k: v.numpy().copy() for k, v in model.state_dict().items()}


@dataclass
class StepResult:
    step: str
    results: List[CompareResult] = field(default_factory=list)
    torch_log: Dict[str, np.ndarray] = field(default_factory=dict)
    paddle_log: Dict[str, np.ndarray] = field(default_factory=dict)
    error: Optional[str] = None
    notes: List[str] = field(default_factory=list)
    series: Dict[str, Any] = field(default_factory=dict)
    first_divergent: Optional[str] = None
    seconds: float = 0.0
    dtype: Optional[str] = None  # the compute dtype the step used on both sides (recorded in the provenance)

    @property
    def passed(self) -> bool:
        return self.error is None and bool(self.results) and all(r.passed for r in self.results)

    @property
    def failed_results(self) -> List[CompareResult]:
        return [r for r in self.results if not r.passed]


# Arrays larger than FULL_MAX elements are kept (and written to the .npy/.npz artifacts) as a fixed strided sample of
# SAMPLE elements, identical indices on both sides; the comparison itself always uses every element. Keeping whole
# arrays cost ~6 GB for 3 float64 iterations of a ResNet-50 (gradient, parameter and momentum of every parameter,
# both sides), which is what pushed the test suite out of memory.
FULL_MAX = 1 << 18
SAMPLE = 1 << 14
# The backward step logs thousands of keys (~2000 per side for PSANet-R50 over 3 iterations), so it keeps at most
# BACKWARD_MAX elements of each: measured on PSANet-R50, the cap above gave 1.4 GiB of artifacts per run, this one
# ~60 MiB (DANet-R101 about twice that), under the 150 MB the default run promises.
BACKWARD_MAX = 2048


def artifact_value(a, full: bool = False, step: Optional[str] = None) -> np.ndarray:
    """`a` itself when `full` or small, else a strided sample of it (flattened): SAMPLE elements of arrays above
    FULL_MAX, or BACKWARD_MAX elements of arrays above that for the backward step's keys."""
    a = np.asarray(a)
    limit, sample = (BACKWARD_MAX, BACKWARD_MAX) if step == "backward" else (FULL_MAX, SAMPLE)
    if full or a.size <= limit:
        return a
    idx = np.linspace(0, a.size - 1, sample).astype(np.int64)
    return a.reshape(-1)[idx]


@dataclass
class Context:
    name: str
    torch_model: Any
    paddle_model: Any
    images: np.ndarray
    labels: np.ndarray
    num_classes: int
    policy: Policy
    out_dir: Path
    iters: int = 3
    seed: int = 0
    ignore_index: int = 255
    recipe: Optional[TrainRecipe] = None
    torch_init: Dict[str, np.ndarray] = field(default_factory=dict)
    paddle_init: Dict[str, np.ndarray] = field(default_factory=dict)
    inputs_note: str = ""
    train_dtype: str = "float64"
    lockstep: bool = True
    full_artifacts: bool = False  # keep whole arrays in the step logs (--full-artifacts), not samples
    _models: Dict[str, Any] = field(default_factory=dict)

    def snapshot(self) -> None:
        """Remember both models' initial state; every step starts from it."""
        self.torch_init = torch_state(self.torch_model)
        self.paddle_init = paddle_state(self.paddle_model)
        self._models = {"float32": (self.torch_model, self.paddle_model)}

    def models(self, dtype: str = "float32"):
        """(torch_model, paddle_model) in `dtype`, both reset to the initial state, gradients cleared.

        float64 copies are made once from the same initial weights (the float32 values, widened exactly)."""
        import copy

        import paddle
        import torch

        if dtype not in self._models:
            if dtype != "float64":
                raise ValueError(f"unsupported compute dtype {dtype!r} (float32 or float64)")
            tm = copy.deepcopy(self.torch_model).double()
            pm = copy.deepcopy(self.paddle_model)
            pm.to(dtype="float64")
            self._models[dtype] = (tm, pm)
        tm, pm = self._models[dtype]
        tdt = getattr(torch, dtype)
        tm.load_state_dict({k: torch.from_numpy(v.copy()).to(tdt) if v.dtype.kind == "f" else torch.from_numpy(v.copy())
                            for k, v in self.torch_init.items()})
        pm.set_state_dict({k: paddle.to_tensor(v.astype(dtype) if v.dtype.kind == "f" else v)
                           for k, v in self.paddle_init.items()})
        tm.zero_grad(set_to_none=True)
        pm.clear_gradients()
        return tm, pm

    def reset(self) -> None:
        self.models("float32")

    def compare(self, step: str, key: str, actual, expected, floor=None) -> CompareResult:
        return self.policy.compare(actual, expected, model=self.name, step=step, key=key, floor=floor)

    def torch_inputs(self, dtype: str = "float32"):
        import torch

        return torch.from_numpy(self.images.astype(dtype)), torch.from_numpy(self.labels.copy())

    def paddle_inputs(self, dtype: str = "float32"):
        import paddle

        return paddle.to_tensor(self.images.astype(dtype)), paddle.to_tensor(self.labels.copy())
