"""Write a model's weights in its OFFICIAL upstream checkpoint format (used to turn random weights into a file that
goes through exactly the same reader/converter path as a real downloaded checkpoint)."""
from __future__ import annotations

from pathlib import Path

import torch

# model name -> upstream checkpoint flavour
FORMATS = {"pspnet": "semseg", "psanet": "semseg", "danet": "encoding"}


def official_state(name: str, model) -> dict:
    """The object the upstream training script saves. semseg: {'epoch', 'state_dict' with 'module.' keys,
    'optimizer'} (saved from a DistributedDataParallel-wrapped model). encoding (junfu1115/DANet): {'epoch',
    'state_dict' WITHOUT a prefix (it saves `model.module.state_dict()`), 'optimizer', 'best_pred'}."""
    fmt = FORMATS.get(name)
    if fmt == "semseg":
        sd = {"module." + k: v.detach().clone() for k, v in model.state_dict().items()}
        return {"epoch": 0, "state_dict": sd, "optimizer": {"state": {}, "param_groups": []}}
    if fmt == "encoding":
        sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return {"epoch": 0, "state_dict": sd, "optimizer": {"state": {}, "param_groups": []}, "best_pred": 0.0}
    raise KeyError(f"no official checkpoint format known for model {name!r}")


def save_official(name: str, model, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(official_state(name, model), path)
    return path
