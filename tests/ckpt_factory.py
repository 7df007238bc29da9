"""Checkpoints in the OFFICIAL upstream formats, made from random weights (tests never download).

    model = random_pspnet(num_classes=3, seed=0)          # torch_ref PSPNet, every parameter AND buffer random
    save_semseg_checkpoint(model, tmp_path / "train_epoch_3.pth")
    save_imagenet_backbone_checkpoint(model, tmp_path / "resnet50_v2.pth")
    save_detectron2_pkl({"w": np.zeros(3, np.float32)}, tmp_path / "model_final.pkl")

Formats (docs/references.md, section 1):
* semseg: `torch.save({'epoch', 'state_dict': {'module.' + key: tensor}, 'optimizer'})` (saved from DDP);
* semseg ImageNet init `initmodel/resnet50_v2.pth`: a flat state dict of the deep-base ResNet with its own stem
  names (`conv1, bn1, conv2, bn2, conv3, bn3`), `layer1..4` and the classifier `fc`;
* detectron2: a pickle of `{'model': {name: numpy array}, '__author__': ..., 'matching_heuristics': True}`.
"""
from __future__ import annotations

import importlib.util
import pickle
import sys
from collections import OrderedDict
from pathlib import Path

# The repository root on sys.path when the package is not installed (plain `pytest` from a checkout).
_ROOT = Path(__file__).resolve().parents[1]
if importlib.util.find_spec("torch_ref") is None and str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

# semseg PSPNet layer0 index -> name of the same module in semseg's ImageNet ResNet
STEM_NAMES = {"layer0.0": "conv1", "layer0.1": "bn1", "layer0.3": "conv2", "layer0.4": "bn2", "layer0.6": "conv3",
              "layer0.7": "bn3"}


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Make every BatchNorm non-trivial (init leaves weight 1, bias 0, mean 0, var 1, which would hide a swapped
    mean/variance or weight/bias): random affine parameters and running statistics, and a random step counter.
    Conv weights keep their (random) init; conv biases become random too."""
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.weight.copy_(0.5 + torch.rand(n, generator=g))
                m.bias.copy_(0.1 * torch.randn(n, generator=g))
                m.running_mean.copy_(0.1 * torch.randn(n, generator=g))
                m.running_var.copy_(0.5 + torch.rand(n, generator=g))
                m.num_batches_tracked.fill_(int(torch.randint(1, 1000, (1,), generator=g)))
            elif isinstance(m, torch.nn.Conv2d) and m.bias is not None:
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
    return model


def random_pspnet(num_classes: int = 3, seed: int = 0, layers: int = 50) -> torch.nn.Module:
    """torch_ref PSPNet with random weights and random BN statistics, in eval mode."""
    import torch_ref

    torch.manual_seed(seed)
    model = torch_ref.build_model("pspnet", num_classes=num_classes, layers=layers)
    return randomize_(model, seed).eval()


def semseg_state_dict(model_or_state_dict) -> "OrderedDict[str, torch.Tensor]":
    """The state dict as semseg saves it: every key prefixed with 'module.' (the model was wrapped in DDP)."""
    sd = model_or_state_dict.state_dict() if hasattr(model_or_state_dict, "state_dict") else model_or_state_dict
    return OrderedDict(("module." + k, v) for k, v in sd.items())


def save_semseg_checkpoint(model_or_state_dict, path, epoch: int = 3) -> Path:
    """Write a hszhao/semseg training checkpoint: {'epoch', 'state_dict': {'module.'+k: v}, 'optimizer'}."""
    sd = semseg_state_dict(model_or_state_dict)
    optimizer = {"state": {}, "param_groups": [{"lr": 0.01, "momentum": 0.9, "weight_decay": 1e-4,
                                                "params": list(range(len(sd)))}]}
    path = Path(path)
    torch.save({"epoch": epoch, "state_dict": sd, "optimizer": optimizer}, path)
    return path


def imagenet_backbone_state_dict(model, num_imagenet_classes: int = 1000, seed: int = 0) -> OrderedDict:
    """semseg's `resnet50_v2.pth` layout taken from a PSPNet's backbone: stem under conv1/bn1/conv2/bn2/conv3/bn3,
    layer1..4 unchanged, plus a random ImageNet classifier fc (classes x 2048)."""
    out = OrderedDict()
    for k, v in model.state_dict().items():
        head = ".".join(k.split(".")[:2])
        if head in STEM_NAMES:
            out[STEM_NAMES[head] + k[len(head):]] = v
        elif k.split(".")[0] in ("layer1", "layer2", "layer3", "layer4"):
            out[k] = v
    g = torch.Generator().manual_seed(seed)
    out["fc.weight"] = 0.01 * torch.randn(num_imagenet_classes, 2048, generator=g)
    out["fc.bias"] = torch.zeros(num_imagenet_classes)
    return out


def save_imagenet_backbone_checkpoint(model, path, num_imagenet_classes: int = 1000) -> Path:
    """Write semseg's ImageNet init `initmodel/resnet50_v2.pth` format (a flat state dict, no 'module.')."""
    path = Path(path)
    torch.save(imagenet_backbone_state_dict(model, num_imagenet_classes), path)
    return path


def save_detectron2_pkl(arrays, path, protocol: int = 3) -> Path:
    """Write a detectron2 model-zoo style .pkl: {'model': {name: numpy array}, '__author__', 'matching_heuristics'}.
    `arrays` may hold torch tensors (converted to numpy)."""
    model = OrderedDict((k, v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v))
                        for k, v in arrays.items())
    path = Path(path)
    with open(path, "wb") as f:
        pickle.dump({"model": model, "__author__": "Detectron2 Model Zoo", "matching_heuristics": True}, f,
                    protocol=protocol)
    return path


def shrink_artifacts(out, limit: int = 1 << 20) -> int:
    """Delete every file over `limit` bytes under `out` (random-weight checkpoints, converted .pdparams, arrays of
    every step) and return the bytes freed. Module-scoped alignment fixtures call it at teardown: a failed run keeps
    its logs, verdict and report for diagnosis, and a whole run stays far under CI's disk budget (the HRNet-OCR
    fixtures alone wrote ~1.2 GB)."""
    freed = 0
    for path in Path(out).rglob("*"):
        if path.is_file() and not path.is_symlink() and path.stat().st_size > limit:
            freed += path.stat().st_size
            path.unlink()
    return freed
