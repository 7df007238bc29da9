"""ToyNet (twin: tests/toy/torch_toy.py): conv-BN-ReLU, a stride-2 conv-BN-ReLU, a 1x1 classifier, bilinear
upsampling back to the input size. Small enough to align in seconds; built from the same layer adapters as the real
twins, so it exercises every path a real model takes (BN statistics, weights conversion, trace, loss, optimizer)."""
from __future__ import annotations

from paddle_impl import layers as L


class ToyNet(L.Module):
    def __init__(self, num_classes: int = 4, width: int = 8, bn_momentum: float = 0.1):
        super().__init__()
        self.num_classes = num_classes
        self.stem = L.Sequential(L.Conv2d(3, width, 3, padding=1, bias=False),
                                 L.BatchNorm2d(width, momentum=bn_momentum), L.ReLU())
        self.down = L.Sequential(L.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False),
                                 L.BatchNorm2d(2 * width, momentum=bn_momentum), L.ReLU())
        self.cls = L.Conv2d(2 * width, num_classes, 1)

    @classmethod
    def check_input(cls, h: int, w: int) -> None:
        if h % 2 or w % 2:
            raise ValueError(f"ToyNet: input size {h}x{w} must be even")

    def forward(self, x):
        """x (N, 3, H, W), H and W even -> logits (N, num_classes, H, W) in both modes."""
        size = L.spatial_size(x)
        x = self.cls(self.down(self.stem(x)))
        return L.interpolate(x, size, align_corners=False)


def build(num_classes: int = 4, **cfg) -> ToyNet:
    return ToyNet(num_classes=num_classes, **cfg)


def infer_config(state_dict, given=None) -> dict:
    """Class count and width read off the weights."""
    if "cls.weight" not in state_dict:
        raise KeyError("cls.weight")
    return {"num_classes": int(state_dict["cls.weight"].shape[0]),
            "width": int(state_dict["stem.0.weight"].shape[0])}
