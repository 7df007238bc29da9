"""Key maps: which Paddle-twin key each official (torch) key fills, and how.

Three layers, applied in this order to every source key:

1. a source *flavour* (optional): a checkpoint that is not the segmentation model's own, e.g. semseg's ImageNet
   backbone `resnet50_v2.pth` (`conv1/bn1/.../fc`), whose names are moved onto torch_ref's (`layer0.0/.1/...`);
   a flavour is only accepted for a partial conversion (`--partial`);
2. the generic BatchNorm renames (`torch_to_paddle_key`): `running_mean -> _mean`, `running_var -> _variance`,
   `num_batches_tracked` dropped (Paddle's BN keeps no step counter);
3. the model's own renames (its spec's `key_renames`, regex -> replacement, full-key match): empty for the models
   whose twins use torch_ref's attribute names verbatim (the twin rule); the hook for a twin that cannot.

Transposition is NOT a key-map rule: only the `weight` of an `nn.Linear` (or subclass) is transposed (torch stores
(out, in), Paddle (in, out)), and that is decided by the type of the module that owns the key in the torch_ref model,
never by the tensor's shape -- a square Linear is transposed, a 2-D `nn.Embedding` weight is not.

`plan_conversion` turns all of this into one `KeyAction` per key (source keys first, in file order, then the twin
keys nothing filled). Actions: copy, rename, transpose, drop, keep-init, fill (fine); unused, missing, mis-shaped,
duplicate (errors).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Optional, Sequence

__all__ = [
    "KeyAction", "SourceFlavour", "ModelKeymap", "KEYMAPS", "FLAVOURS", "OK_ACTIONS", "ERROR_ACTIONS",
    "torch_to_paddle_key", "get_keymap", "keymap_from_spec", "linear_weight_keys", "plan_conversion", "materialize",
]

OK_ACTIONS = ("copy", "rename", "transpose", "drop", "keep-init", "fill")
ERROR_ACTIONS = ("unused", "missing", "mis-shaped", "duplicate")

BN_RENAMES = {"running_mean": "_mean", "running_var": "_variance"}
DROP_NUM_BATCHES = "drop: BatchNorm step counter (Paddle's BatchNorm keeps none)"


def torch_to_paddle_key(key: str) -> Optional[str]:
    """Generic torch -> Paddle renames of one state_dict key; None means the key is dropped.

    `a.bn.running_mean -> a.bn._mean`, `a.bn.running_var -> a.bn._variance`, `a.bn.num_batches_tracked -> None`;
    every other key is unchanged (Paddle's conv / BN weight and bias keep torch's names and layouts).
    """
    head, dot, leaf = key.rpartition(".")
    if leaf == "num_batches_tracked":
        return None
    if leaf in BN_RENAMES:
        return f"{head}{dot}{BN_RENAMES[leaf]}"
    return key


@dataclass(frozen=True)
class KeyAction:
    """One row of the conversion plan / report.

    source/target: key in the (unwrapped, `module.`-stripped) checkpoint / in the Paddle twin (None where there is
    none); source_shape/target_shape: the shapes on each side (target = the twin's); dtype: the source dtype, with
    '->' when the value is cast to the twin's dtype; action: see module docstring; reason: why (always set for drop,
    keep-init and errors).
    """
    source: Optional[str]
    target: Optional[str]
    source_shape: Optional[tuple]
    target_shape: Optional[tuple]
    dtype: Optional[str]
    action: str
    reason: str = ""

    @property
    def ok(self) -> bool:
        return self.action in OK_ACTIONS

    @property
    def transpose(self) -> bool:
        return self.action == "transpose"

    def to_dict(self) -> dict:
        return {
            "source": self.source,
            "target": self.target,
            "source_shape": list(self.source_shape) if self.source_shape is not None else None,
            "target_shape": list(self.target_shape) if self.target_shape is not None else None,
            "dtype": self.dtype,
            "action": self.action,
            "reason": self.reason,
        }


@dataclass(frozen=True)
class SourceFlavour:
    """A foreign checkpoint layout a model accepts for partial conversion (e.g. an ImageNet backbone).

    detect(keys) -> bool says whether a checkpoint is of this flavour; map_key(key) -> (torch_ref key, reason) moves a
    key onto torch_ref's names, or returns (None, reason) for a key to drop (dropped only with --partial).
    fill(twin key) -> (value, reason) or None: a twin key such files never hold but whose value the official loader
    sets (action "fill": a constant tensor of the twin's shape, reported with the reason).
    """
    name: str
    description: str
    detect: Callable[[Sequence[str]], bool]
    map_key: Callable[[str], tuple]
    requires_partial: bool = True
    fill: Optional[Callable[[str], Optional[tuple]]] = None


def _first_match(rules, key: str) -> Optional[str]:
    return next((reason for pattern, reason in rules if re.fullmatch(pattern, key)), None)


@dataclass(frozen=True)
class ModelKeymap:
    """Everything model-specific the converter needs (plain data + two small functions)."""
    model: str
    renames: tuple = ()  # ((regex, replacement), ...) applied to the Paddle key after the BN renames
    partial_aliases: Mapping[str, tuple] = field(default_factory=dict)  # --partial NAME -> key prefixes
    flavours: tuple = ()
    infer_partial_config: Optional[Callable[[Mapping[str, tuple]], dict]] = None  # cfg when the head is absent
    # ((regex, reason), ...): source keys of the official format that the model never had a use for; they are
    # dropped by this explicit rule (each one reported with the reason), never silently. Full-key match.
    ignored: tuple = ()
    # ((regex, reason), ...): twin keys inside a --partial scope that a pretrained init may lack (HRNet's PSA blocks
    # in a PSA-less HRNet file); a partial conversion reports them keep-init with the reason. Full-key match.
    init_keeps: tuple = ()

    def ignore_reason(self, source_key: str) -> Optional[str]:
        """The reason `source_key` is dropped by an `ignored` rule, or None when no rule matches it."""
        return _first_match(self.ignored, source_key)

    def init_keep_reason(self, twin_key: str) -> Optional[str]:
        """The reason a partial init may leave `twin_key` at the twin's own initialisation, or None."""
        return _first_match(self.init_keeps, twin_key)

    def to_paddle(self, torch_key: str) -> Optional[str]:
        key = torch_to_paddle_key(torch_key)
        if key is None:
            return None
        for pattern, repl in self.renames:
            key = re.sub(rf"\A(?:{pattern})\Z", repl, key)
        return key

    def expand_partial(self, prefixes: Iterable[str]) -> tuple:
        out = []
        for p in prefixes:
            for q in self.partial_aliases.get(p, (p,)):
                if q not in out:
                    out.append(q)
        return tuple(out)

    def detect_flavour(self, keys: Sequence[str]) -> Optional[SourceFlavour]:
        keys = list(keys)
        return next((f for f in self.flavours if f.detect(keys)), None)


# --------------------------------------------------------------------------------------------------------------------
# pspnet

_IMAGENET_FC = "drop: ImageNet classifier (not in the segmentation model)"
_DEEP_STEM = {"conv1": "layer0.0", "bn1": "layer0.1", "conv2": "layer0.3", "bn2": "layer0.4", "conv3": "layer0.6",
              "bn3": "layer0.7"}
_STEM_RE = re.compile(r"(conv[123]|bn[123])\.(.+)")


def _semseg_imagenet_detect(keys: Sequence[str]) -> bool:
    ks = set(keys)
    return "conv1.weight" in ks and "layer0.0.weight" not in ks


def _semseg_imagenet_map(key: str) -> tuple:
    m = _STEM_RE.fullmatch(key)
    if m:
        return f"{_DEEP_STEM[m.group(1)]}.{m.group(2)}", f"ImageNet stem {m.group(1)} -> {_DEEP_STEM[m.group(1)]}"
    if key.startswith("fc."):
        return None, _IMAGENET_FC
    return key, ""


SEMSEG_IMAGENET_RESNET = SourceFlavour(
    name="semseg-imagenet-resnet",
    description="semseg's ImageNet ResNet (initmodel/resnet50_v2.pth): deep stem conv1/bn1/conv2/bn2/conv3/bn3 -> "
                "layer0.{0,1,3,4,6,7}, layer1..4 unchanged, fc dropped",
    detect=_semseg_imagenet_detect,
    map_key=_semseg_imagenet_map,
)


def _resnet_depth_from_keys(shapes: Mapping[str, tuple], prefix: str = "") -> dict:
    """{'layers': depth} from the number of blocks in layer3 (semseg / torchvision layout) or res4 (detectron2's),
    the only stage whose length tells 50/101/152."""
    from torch_ref.backbones.d2_resnet import depth_from_res4
    from torch_ref.backbones.resnet import depth_from_keys

    for read in (lambda: depth_from_keys("backbone", shapes, prefix), lambda: depth_from_res4(shapes, prefix)):
        try:
            return {"layers": read()}
        except ValueError:
            continue
    return {}


# --------------------------------------------------------------------------------------------------------------------
# danet

_TV_STEM_OR_STAGE = re.compile(r"(conv1|bn1|layer[1-4])\..+")


def _torchvision_resnet_detect(keys: Sequence[str]) -> bool:
    ks = set(keys)
    return "conv1.weight" in ks and "pretrained.conv1.weight" not in ks


def _torchvision_resnet_map(key: str) -> tuple:
    if key.startswith("fc."):
        return None, _IMAGENET_FC
    if _TV_STEM_OR_STAGE.fullmatch(key):
        return "pretrained." + key, "ImageNet ResNet -> DANet's `pretrained.` backbone"
    return key, ""


TORCHVISION_IMAGENET_RESNET = SourceFlavour(
    name="torchvision-imagenet-resnet",
    description="a torchvision-layout ImageNet ResNet (conv1/bn1/layer1..4/fc, 7x7 stem; encoding's resnet101 with "
                "--no-deepstem): every key moved under `pretrained.`, fc dropped",
    detect=_torchvision_resnet_detect,
    map_key=_torchvision_resnet_map,
)

# --------------------------------------------------------------------------------------------------------------------
# pointrend: detectron2's ImageNet init, MSRA R-50/R-101 in Caffe2 blob names (R-101.pkl)

_D2_TRUNK = "backbone.bottom_up."
_C2_CONV = {"1": "shortcut", "2a": "conv1", "2b": "conv2", "2c": "conv3"}
_C2_NORM = {"s": "weight", "b": "bias", "rm": "running_mean", "riv": "running_var"}
#: (pattern, target builder, reason): every Caffe2 blob name the map knows, and nothing else
_C2_RULES = (
    (re.compile(r"conv1_w"), lambda m: "stem.conv1.weight", "Caffe2 stem conv1_w -> stem.conv1.weight"),
    (re.compile(r"res_conv1_bn_(s|b|rm|riv)"), lambda m: f"stem.conv1.norm.{_C2_NORM[m.group(1)]}",
     "Caffe2 stem BN res_conv1_bn_* -> stem.conv1.norm.*"),
    (re.compile(r"res(\d)_(\d+)_branch(1|2a|2b|2c)_w"),
     lambda m: f"res{m.group(1)}.{m.group(2)}.{_C2_CONV[m.group(3)]}.weight",
     "Caffe2 resN_B_branchX_w -> resN.B.{shortcut,conv1,conv2,conv3}.weight (branch1, 2a, 2b, 2c)"),
    (re.compile(r"res(\d)_(\d+)_branch(1|2a|2b|2c)_bn_(s|b|rm|riv)"),
     lambda m: f"res{m.group(1)}.{m.group(2)}.{_C2_CONV[m.group(3)]}.norm.{_C2_NORM[m.group(4)]}",
     "Caffe2 BN _bn_s/_bn_b/_bn_rm/_bn_riv -> .norm.weight/bias/running_mean/running_var"),
)


def _caffe2_resnet_detect(keys: Sequence[str]) -> bool:
    ks = set(keys)
    return "conv1_w" in ks or "res2_0_branch2a_w" in ks


def _caffe2_resnet_map(key: str) -> tuple:
    if key.startswith("fc1000_"):
        return None, _IMAGENET_FC
    if key.endswith("_momentum"):
        return None, "drop: Caffe2 optimizer momentum blob (detectron2 drops it too)"
    for pattern, target, why in _C2_RULES:
        m = pattern.fullmatch(key)
        if m:
            return _D2_TRUNK + target(m), why
    return key, ""  # unknown: reported as unused by the plan


_FROZEN_STAT = re.compile(re.escape(_D2_TRUNK) + r"(?:stem|res\d\.\d+)\.\w+\.norm\.running_(mean|var)")


def _caffe2_resnet_fill(twin_key: str) -> Optional[tuple]:
    m = _FROZEN_STAT.fullmatch(twin_key)
    if not m:
        return None
    value = 0.0 if m.group(1) == "mean" else 1.0
    return value, ("the Caffe2 file folds BN into its affine _bn_s/_bn_b and holds no running statistics; "
                   "detectron2's FrozenBatchNorm2d loads such files with running_mean 0 and running_var 1")


CAFFE2_IMAGENET_RESNET = SourceFlavour(
    name="caffe2-msra-resnet",
    description="detectron2's ImageNet init R-50.pkl / R-101.pkl (MSRA, Caffe2 blob names conv1_w, res_conv1_bn_s, "
                "resN_B_branch{1,2a,2b,2c}_{w,bn_s,bn_b}): mapped onto backbone.bottom_up.*, fc1000 dropped, "
                "FrozenBN running statistics filled (mean 0, var 1)",
    detect=_caffe2_resnet_detect,
    map_key=_caffe2_resnet_map,
    fill=_caffe2_resnet_fill,
)

# --------------------------------------------------------------------------------------------------------------------
# hrnet_ocr_psa: HRNet-Image-Classification's ImageNet HRNetV2 (hrnetv2_w48_imagenet_pretrained.pth)

_HRNET_TRUNK = re.compile(r"(conv[12]|bn[12]|layer1|transition[1-3]|stage[2-4])\..+")
_HRNET_CLS_HEAD = re.compile(r"(incre_modules|downsamp_modules|final_layer|classifier)\..+")


def _hrnet_imagenet_detect(keys: Sequence[str]) -> bool:
    ks = set(keys)
    return "stage2.0.branches.0.0.conv1.weight" in ks and "backbone.conv1.weight" not in ks


def _hrnet_imagenet_map(key: str) -> tuple:
    if _HRNET_CLS_HEAD.fullmatch(key):
        return None, ("drop: HRNet's ImageNet classification head (incre_modules / downsamp_modules / final_layer / "
                      "classifier), not part of HRNetV2's segmentation trunk")
    if _HRNET_TRUNK.fullmatch(key):
        return "backbone." + key, "ImageNet HRNetV2 trunk -> `backbone.`"
    return key, ""  # unknown: reported as unused by the plan


HRNET_IMAGENET = SourceFlavour(
    name="hrnet-imagenet",
    description="HRNet-Image-Classification's ImageNet HRNetV2 (conv1/bn1/conv2/bn2/layer1/transition1-3/stage2-4 "
                "at the top level, plus its classification head incre_modules/downsamp_modules/final_layer/"
                "classifier): the trunk moved under `backbone.`, the classification head dropped",
    detect=_hrnet_imagenet_detect,
    map_key=_hrnet_imagenet_map,
)

#: flavour name (a spec's `source_flavours`) -> SourceFlavour
FLAVOURS = {f.name: f for f in (SEMSEG_IMAGENET_RESNET, TORCHVISION_IMAGENET_RESNET, CAFFE2_IMAGENET_RESNET,
                                HRNET_IMAGENET)}


def keymap_from_spec(spec) -> ModelKeymap:
    """The converter's view of a model spec (alignment.specs.ModelSpec)."""
    unknown = [f for f in spec.source_flavours if f not in FLAVOURS]
    if unknown:
        raise KeyError(f"{spec.name}: unknown source flavour(s) {unknown}; known: {', '.join(FLAVOURS)}")

    def infer_partial_config(shapes):
        for prefix in spec.backbone_prefixes:
            cfg = _resnet_depth_from_keys(shapes, prefix)
            if cfg:
                return cfg
        return {}

    return ModelKeymap(
        model=spec.name,
        renames=tuple(spec.key_renames),
        partial_aliases=dict(spec.partial_aliases),
        flavours=tuple(FLAVOURS[f] for f in spec.source_flavours),
        infer_partial_config=infer_partial_config,
        ignored=tuple(spec.ignored_keys),
        init_keeps=tuple(spec.init_keeps),
    )


class _Keymaps(Mapping):
    """{model name: ModelKeymap}, a live view of the spec table (a spec added at run time has its key map)."""

    def __getitem__(self, name):
        from alignment.specs import SPECS
        return keymap_from_spec(SPECS[name])

    def __iter__(self):
        from alignment.specs import SPECS
        return iter(sorted(SPECS))

    def __len__(self):
        from alignment.specs import SPECS
        return len(SPECS)


KEYMAPS = _Keymaps()


def get_keymap(name: str) -> ModelKeymap:
    from alignment.specs import get_spec
    return keymap_from_spec(get_spec(name))


# --------------------------------------------------------------------------------------------------------------------
# planning


def linear_weight_keys(torch_module) -> set:
    """state_dict keys of every `nn.Linear` (or subclass) weight in `torch_module`: the only keys transposed."""
    import torch.nn as nn

    out = set()
    for path, mod in torch_module.named_modules():
        if isinstance(mod, nn.Linear) and getattr(mod, "weight", None) is not None:
            out.add(f"{path}.weight" if path else "weight")
    return out


def _shape(s) -> tuple:
    return tuple(int(d) for d in (s.shape if hasattr(s, "shape") else s))


def plan_conversion(torch_module, source_keys_and_shapes, keymap: Optional[ModelKeymap] = None, *,
                    target_shapes: Optional[Mapping[str, Sequence[int]]] = None, partial: Sequence[str] = (),
                    flavour: Optional[SourceFlavour] = None, dtypes: Optional[Mapping[str, str]] = None,
                    target_dtypes: Optional[Mapping[str, str]] = None) -> list:
    """One KeyAction per source key (in order), then one per twin key no source key fills.

    torch_module: the torch_ref model (any device; `torch.device("meta")` costs nothing) -- its module types decide
    transposition. source_keys_and_shapes: mapping or (key, shape) pairs of the checkpoint (already unwrapped and
    `module.`-stripped). keymap: the model's ModelKeymap (None: generic BN renames only). target_shapes: the Paddle
    twin's state_dict shapes (None: derived from torch_module through the key map, i.e. the twin rule). partial:
    EXPANDED key prefixes the checkpoint is expected to cover (twin keys outside them are keep-init; empty = all).
    flavour: a SourceFlavour to apply to source names. dtypes / target_dtypes: dtype names per source / twin key,
    recorded in the rows ('float16->float32' where the value is cast).
    """
    keymap = keymap or ModelKeymap(model="<generic>")
    items = list(source_keys_and_shapes.items()) if isinstance(source_keys_and_shapes, Mapping) \
        else list(source_keys_and_shapes)
    linear = linear_weight_keys(torch_module)
    torch_keys = list(torch_module.state_dict().keys())
    if target_shapes is None:
        sd = torch_module.state_dict()
        target_shapes = {}
        for k in torch_keys:
            pk = keymap.to_paddle(k)
            if pk is not None:
                s = _shape(sd[k])
                target_shapes[pk] = s[::-1] if k in linear else s
    target_shapes = {k: _shape(v) for k, v in target_shapes.items()}
    # twin key -> torch_ref key, to name the torch-side key of a missing twin key
    torch_name_of = {keymap.to_paddle(k): k for k in torch_keys if keymap.to_paddle(k) is not None}
    dtypes = dtypes or {}
    target_dtypes = target_dtypes or {}

    def dtype_note(src_key, tgt_key):
        d = dtypes.get(src_key)
        t = target_dtypes.get(tgt_key) if tgt_key is not None else None
        if d is not None and t is not None and d != t and _is_float(d) and _is_float(t):
            return f"{d}->{t}"
        return d

    rows = []
    filled: dict = {}
    for skey, sshape in items:
        sshape = _shape(sshape)
        ignored = keymap.ignore_reason(skey)
        if ignored is not None:
            rows.append(KeyAction(skey, None, sshape, None, dtypes.get(skey), "drop", ignored))
            continue
        tkey, why = (skey, "")
        if flavour is not None:
            tkey, why = flavour.map_key(skey)
            if tkey is None:
                if partial or not flavour.requires_partial:
                    rows.append(KeyAction(skey, None, sshape, None, dtypes.get(skey), "drop", why))
                else:
                    rows.append(KeyAction(skey, None, sshape, None, dtypes.get(skey), "unused",
                                          f"{why.replace('drop: ', '')}; dropped only for a partial conversion "
                                          f"(--partial)"))
                continue
        pkey = keymap.to_paddle(tkey)
        if pkey is None:
            rows.append(KeyAction(skey, None, sshape, None, dtypes.get(skey), "drop", DROP_NUM_BATCHES))
            continue
        if pkey not in target_shapes:
            rows.append(KeyAction(skey, pkey, sshape, None, dtypes.get(skey), "unused",
                                  f"the Paddle twin has no key {pkey!r}"))
            continue
        if partial and not pkey.startswith(tuple(partial)):
            rows.append(KeyAction(skey, None, sshape, None, dtypes.get(skey), "drop",
                                  f"outside --partial {', '.join(partial)}: not converted (the twin's "
                                  f"{pkey!r} keeps its initialisation)"))
            continue
        tshape = target_shapes[pkey]
        if pkey in filled:
            rows.append(KeyAction(skey, pkey, sshape, tshape, dtypes.get(skey), "duplicate",
                                  f"{pkey!r} is already filled by source key {filled[pkey]!r}"))
            continue
        transpose = tkey in linear
        if transpose and len(sshape) != 2:
            rows.append(KeyAction(skey, pkey, sshape, tshape, dtypes.get(skey), "mis-shaped",
                                  f"nn.Linear weight with {len(sshape)} dims"))
            continue
        eff = sshape[::-1] if transpose else sshape
        if eff != tshape:
            note = " after transposing the nn.Linear weight" if transpose else ""
            rows.append(KeyAction(skey, pkey, sshape, tshape, dtypes.get(skey), "mis-shaped",
                                  f"source {list(sshape)}{note} vs twin {list(tshape)}"))
            filled[pkey] = skey
            continue
        filled[pkey] = skey
        if transpose:
            action, reason = "transpose", f"nn.Linear weight {tkey!r}: torch (out, in) -> Paddle (in, out)"
        elif pkey != skey:
            action, reason = "rename", why or "BatchNorm running statistics: Paddle names"
        else:
            action, reason = "copy", ""
        rows.append(KeyAction(skey, pkey, sshape, tshape, dtype_note(skey, pkey), action, reason))

    for tkey, tshape in target_shapes.items():
        if tkey in filled:
            continue
        if partial and not any(tkey.startswith(p) for p in partial):
            rows.append(KeyAction(None, tkey, None, tshape, target_dtypes.get(tkey), "keep-init",
                                  f"outside --partial {', '.join(partial)}: keeps the twin's initialisation"))
        elif partial and keymap.init_keep_reason(tkey) is not None:
            rows.append(KeyAction(None, tkey, None, tshape, target_dtypes.get(tkey), "keep-init",
                                  keymap.init_keep_reason(tkey)))
        elif flavour is not None and flavour.fill is not None and flavour.fill(tkey) is not None:
            value, why = flavour.fill(tkey)
            rows.append(KeyAction(None, tkey, None, tshape, target_dtypes.get(tkey), "fill", f"= {value}: {why}"))
        else:
            tname = torch_name_of.get(tkey)
            hint = f" (torch_ref key {tname!r})" if tname and tname != tkey else ""
            rows.append(KeyAction(None, tkey, None, tshape, target_dtypes.get(tkey), "missing",
                                  f"no source key fills it{hint}"))
    return rows


def _is_float(d: str) -> bool:
    return "float" in d


def materialize(row: KeyAction, tensor, target_dtype: Optional[str] = None):
    """The numpy array a copy/rename/transpose row writes for `tensor` (a torch tensor).

    float32 stays float32 and integer buffers keep their dtype; a floating tensor whose dtype differs from the twin's
    (`target_dtype`, e.g. float16 or bfloat16 -> float32) is cast to it. Transposed arrays are made C-contiguous.
    """
    import numpy as np
    import torch

    if row.action not in ("copy", "rename", "transpose"):
        raise ValueError(f"row {row.source!r} has action {row.action!r}: nothing to write")
    t = tensor.detach()
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16; float32 holds it exactly
        t = t.to(torch.float32)
    arr = t.numpy()
    if target_dtype is not None and arr.dtype.kind == "f" and np.dtype(target_dtype).kind == "f" \
            and arr.dtype != np.dtype(target_dtype):
        arr = arr.astype(target_dtype)
    if row.action == "transpose":
        arr = np.ascontiguousarray(arr.T)
    return arr
