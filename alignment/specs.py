"""One spec per model: every framework-neutral fact the rest of segtwin switches on a model name for.

    from alignment.specs import get_spec, SPECS
    spec = get_spec("psanet")
    model = spec.build("torch", num_classes=19)          # torch_ref twin   (torch_ref.build_model uses this)
    twin = spec.build("paddle", num_classes=19)          # paddle_impl twin (paddle_impl.build_model uses this)
    cfg = spec.infer_config(state_dict, given={"psa_type": 0})   # explicit cfg wins over what the weights imply

`SPECS` is a plain dict `{name: ModelSpec}`; nothing registers itself. Adding a model is: its two model files
(`torch_ref/models/X.py`, `paddle_impl/models/X.py`, each with `build(**cfg)` and `infer_config(state_dict)`), one
entry here, one config, its tolerance lines (docs/adding-a-model.md).

This module imports neither torch nor paddle: builders and other callables are named as "module:attribute" strings
and imported when used, so a Paddle-only process never imports torch through it (and vice versa).
"""
from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

__all__ = ["ModelSpec", "SPECS", "get_spec", "model_names", "ConfigInferenceError", "config_keys",
           "normalise_cfg", "parse_cfg_items", "resolve"]

FRAMEWORKS = ("torch", "paddle")


class ConfigInferenceError(ValueError):
    """A model config value cannot be read off a checkpoint; the message names the option that supplies it."""


def resolve(ref: str) -> Any:
    """'package.module:attr' -> the attribute (imported on demand)."""
    module, _, attr = ref.partition(":")
    if not attr:
        raise ValueError(f"reference {ref!r} must be 'module:attribute'")
    return getattr(importlib.import_module(module), attr)


@dataclass(frozen=True)
class ModelSpec:
    """Framework-neutral facts of one model.

    name: the name used everywhere (CLI, configs, file names). title/upstream: for humans and the README table.
    torch_module / paddle_module: the two twin files; each defines `build(**cfg)` and `infer_config(state_dict)`.
    official_format: how the upstream training script saves checkpoints (`torch_ref.official.FORMATS`).
    loss_terms: ((term, weight), ...) in the order the model returns its outputs in training mode.
    ignore_label: the label the OFFICIAL criterion ignores when it is not the dataset's 255 (DANet: -1); the targets
        are relabelled so the loss sees the official ones. None: the dataset's ignore index as it is.
    head_prefixes / head_lr_mult: parameter names of the "head" group of the official recipe and its lr multiplier.
    zero_init_params: parameters initialised to zero that switch a whole branch off (the alignment wakes them).
    custom_ops: custom operators the model may need ("psa_mask", "psa_attend"): exported programs must load them.
    inference_cfg: model options the inference commands (`segtwin eval`, `predict`, `export`) take where the
        config's `model:` section does not set the key (`engine._cli.inference_options`): implementation choices
        proven equal to the official path that need less memory. Training and `segtwin align` build the config as
        written (the model's own defaults).
    inference_unless: {key: (model options, reason)}: the inference default of `key` does not apply to a config
        whose `model:` section has all those values (PSANet's compact mode has no PSA mask to fuse).
    input_rule: the official code's input-size rule in words (enforced by the model's `check_input`).
    align_input / align_cfg: the default `segtwin align` input (N, C, H, W) and model cfg.
    partial_aliases: `--partial NAME` -> twin key prefixes (e.g. "backbone"). source_flavours: names of foreign
        checkpoint layouts accepted for partial conversion (`weights_convert.keymap.FLAVOURS`).
    ignored_keys: ((regex, reason), ...) official keys the model never used, dropped by this explicit rule.
    key_renames: ((regex, replacement), ...) torch -> Paddle key renames beyond the BatchNorm ones (empty while the
        twin keeps torch_ref's attribute names, as the twin rule asks).
    backbone_prefixes: where the ResNet of the model lives, tried in order to read the depth of a partial checkpoint.
    recipe: the config of the official training recipe (`paddle_impl/configs/...`).
    point_sampling: the training forward samples points at random and selects them by a top-k (PointRend): the
        alignment feeds both twins the same uniform numbers and the torch side's selection (steps/common.py).
    loss_terms_by: ((cfg key, value, loss terms), ...): a model whose training outputs depend on its config (HRNet-OCR
        without `mscale` returns two outputs, not four) names the other term lists here; `loss_terms_for(cfg)`
        picks the first rule whose key has that value in cfg, else `loss_terms`.
    official_loss: {term: loss type entry (`alignment.recipe.LOSS_TYPES`)}: the official criterion of each term
        when it is not cross-entropy (HRNet-OCR: NVIDIA's RMI loss, its RMI half on the main term only).
    init_keeps: ((regex, reason), ...): twin keys inside the backbone that a pretrained init may lack and that keep
        the model's own initialisation, as the upstream loader does (HRNet's PSA blocks: the ImageNet and Mapillary
        HRNets have none). `segtwin convert --partial` reports them keep-init, `model.backbone_pretrained` allows
        them to be absent; both name each one. Full-key match.
    """
    name: str
    title: str
    upstream: str
    torch_module: str
    paddle_module: str
    official_format: str
    loss_terms: Tuple[Tuple[str, float], ...]
    ignore_label: Optional[int] = None
    head_prefixes: Tuple[str, ...] = ()
    head_lr_mult: float = 10.0
    zero_init_params: Tuple[str, ...] = ()
    custom_ops: Tuple[str, ...] = ()
    input_rule: str = "any size"
    align_input: Tuple[int, int, int, int] = (2, 3, 65, 65)
    align_cfg: Mapping[str, Any] = field(default_factory=dict)
    partial_aliases: Mapping[str, Tuple[str, ...]] = field(default_factory=dict)
    source_flavours: Tuple[str, ...] = ()
    ignored_keys: Tuple[Tuple[str, str], ...] = ()
    key_renames: Tuple[Tuple[str, str], ...] = ()
    backbone_prefixes: Tuple[str, ...] = ("",)
    recipe: Optional[str] = None
    point_sampling: bool = False
    loss_terms_by: Tuple[Tuple[str, Any, Tuple[Tuple[str, float], ...]], ...] = ()
    official_loss: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    init_keeps: Tuple[Tuple[str, str], ...] = ()
    inference_cfg: Mapping[str, Any] = field(default_factory=dict)
    inference_unless: Mapping[str, Tuple[Mapping[str, Any], str]] = field(default_factory=dict)

    # ------------------------------------------------------------------------------------------------ twins
    def module(self, framework: str):
        if framework not in FRAMEWORKS:
            raise ValueError(f"framework must be one of {FRAMEWORKS}, got {framework!r}")
        return importlib.import_module(self.torch_module if framework == "torch" else self.paddle_module)

    def builder(self, framework: str) -> Callable:
        return self.module(framework).build

    def build(self, framework: str, **cfg):
        """The `framework` twin with random weights; cfg goes through `normalise_cfg` first."""
        return self.builder(framework)(**normalise_cfg(self, cfg))

    def config_keys(self) -> Dict[str, Any]:
        return config_keys(self)

    def infer_config(self, state_dict, given: Optional[Mapping[str, Any]] = None, framework: str = "torch") -> dict:
        """The model config an official state_dict implies, with `given` (explicit cfg) winning over it.

        The twin's `infer_config(state_dict, given)` reads only what `given` leaves open; a value it cannot read
        raises ConfigInferenceError naming the `--cfg` option that supplies it. A missing key is a KeyError that
        names it."""
        given = dict(given or {})
        fn = self.module(framework).infer_config
        try:
            inferred = fn(state_dict, given) if len(inspect.signature(fn).parameters) > 1 else fn(state_dict)
        except KeyError as e:
            raise KeyError(f"{self.name}: cannot infer the model config from the checkpoint: key {e.args[0]!r} is "
                           "missing") from None
        return {**inferred, **given}

    # ------------------------------------------------------------------------------------------------ loss
    @property
    def loss_term_names(self) -> Tuple[str, ...]:
        return tuple(t for t, _ in self.loss_terms)

    def loss_terms_for(self, cfg: Optional[Mapping[str, Any]] = None) -> Tuple[Tuple[str, float], ...]:
        """The loss terms of the model built with `cfg` (its `model:` section): see `loss_terms_by`."""
        cfg = cfg or {}
        for key, value, terms in self.loss_terms_by:
            if key in cfg and cfg[key] == value:
                return terms
        return self.loss_terms


def _builder_params(fn) -> Dict[str, inspect.Parameter]:
    """Named parameters of a builder, following `**cfg` into the class named by its return annotation."""
    sig = inspect.signature(fn)
    params = {n: p for n, p in sig.parameters.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    if any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values()):
        ann = sig.return_annotation
        cls = getattr(inspect.getmodule(fn), ann, None) if isinstance(ann, str) else ann
        if inspect.isclass(cls):
            for n, p in inspect.signature(cls.__init__).parameters.items():
                if n != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
                    params.setdefault(n, p)
    return params


def config_keys(spec: ModelSpec) -> Dict[str, Any]:
    """{cfg key: accepted python type(s) or None (any)} of the model, read off the Paddle builder's signature.

    The type comes from the default value (bool, int, float -> int or float, str, tuple/list -> list); a default
    of None accepts any value. semseg's own argument names are accepted where the builder documents them."""
    out: Dict[str, Any] = {}
    for name, p in _builder_params(spec.builder("paddle")).items():
        d = p.default
        if d is inspect.Parameter.empty or d is None:
            out[name] = None
        elif isinstance(d, bool):
            out[name] = bool
        elif isinstance(d, int):
            out[name] = int
        elif isinstance(d, float):
            out[name] = (int, float)
        elif isinstance(d, str):
            out[name] = str
        elif isinstance(d, (tuple, list)):
            out[name] = list
        else:
            out[name] = None
    return out


def parse_cfg_items(items) -> dict:
    """`--cfg` values -> a cfg dict: ['psa_type=0', 'compact=true', 'mask_size=7,11'] -> {'psa_type': 0,
    'compact': True, 'mask_size': [7, 11]}. Values are YAML scalars; a bare comma list is a list. ValueError (one
    line, naming the item) for anything that is not KEY=VALUE or repeats a key."""
    import yaml

    cfg: Dict[str, Any] = {}
    for item in items or ():
        key, sep, value = str(item).partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"--cfg takes KEY=VALUE, got {item!r}")
        if key in cfg:
            raise ValueError(f"--cfg {key} given twice ({cfg[key]!r} and {value!r})")
        text = value.strip()
        try:
            if "," in text and not text.startswith(("[", "{", "'", '"')):
                cfg[key] = [yaml.safe_load(v) for v in text.split(",")]
            else:
                cfg[key] = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ValueError(f"--cfg {item!r}: not a YAML value ({' '.join(str(e).split())})") from None
    return cfg


def normalise_cfg(spec: ModelSpec, cfg: Mapping[str, Any]) -> dict:
    """cfg with list values where a builder takes tuples (YAML and --cfg give lists)."""
    out = dict(cfg)
    for k, v in out.items():
        if isinstance(v, list):
            out[k] = tuple(v)
    return out


# ----------------------------------------------------------------------------------------------------------------
# the table

_RESNET_STAGES = ("layer0.", "layer1.", "layer2.", "layer3.", "layer4.")
_SEMSEG_INPUT = "(H-1) % 8 == 0 and (W-1) % 8 == 0 (semseg's rule: 473, 713, 705, ...)"

SPECS: Dict[str, ModelSpec] = {
    "pspnet": ModelSpec(
        name="pspnet", title="PSPNet-R50", upstream="hszhao/semseg model/pspnet.py",
        torch_module="torch_ref.models.pspnet", paddle_module="paddle_impl.models.pspnet",
        official_format="semseg",
        loss_terms=(("main", 1.0), ("aux", 0.4)),  # semseg: main_loss + aux_weight * aux_loss, aux_weight 0.4
        head_prefixes=("ppm.", "cls.", "aux."), head_lr_mult=10.0,
        input_rule=_SEMSEG_INPUT, align_input=(2, 3, 65, 65),
        partial_aliases={"backbone": _RESNET_STAGES}, source_flavours=("semseg-imagenet-resnet",),
        recipe="paddle_impl/configs/pspnet_r50_cityscapes.yml",
    ),
    "psanet": ModelSpec(
        name="psanet", title="PSANet-R50", upstream="hszhao/semseg model/psanet.py",
        torch_module="torch_ref.models.psanet", paddle_module="paddle_impl.models.psanet",
        official_format="semseg",
        loss_terms=(("main", 1.0), ("aux", 0.4)),  # semseg: same criterion and aux weight as PSPNet
        head_prefixes=("psa.", "cls.", "aux."), head_lr_mult=10.0,
        custom_ops=("psa_mask", "psa_attend"),  # one library holds both (custom_ops/build.py PADDLE_OPS)
        input_rule=_SEMSEG_INPUT, align_input=(2, 3, 65, 65),
        partial_aliases={"backbone": _RESNET_STAGES}, source_flavours=("semseg-imagenet-resnet",),
        recipe="paddle_impl/configs/psanet_r50_cityscapes_1024x512_80k.yml",
        # fused PSA aggregation (ops/psa_attend.py): no (N, HW, HW) map; equal to the reference to 2.4e-15 (float64)
        inference_cfg={"psa_impl": "fused"},
        # compact mode attends with the logits themselves (no PSA mask): the fused kernel has nothing to replace
        inference_unless={"psa_impl": ({"compact": True}, "compact mode has no PSA mask to fuse; the reference "
                                                          "path")},
    ),
    "danet": ModelSpec(
        name="danet", title="DANet-R101", upstream="junfu1115/DANet encoding/models/sseg/danet.py",
        torch_module="torch_ref.models.danet", paddle_module="paddle_impl.models.danet",
        official_format="encoding",
        loss_terms=(("sasc", 1.0), ("sa", 1.0), ("sc", 1.0)),  # SegmentationMultiLosses: plain sum
        ignore_label=-1,  # DANet's datasets turn 255 into -1 and its criterion ignores -1
        head_prefixes=("head.",), head_lr_mult=10.0,
        zero_init_params=("head.sa.gamma", "head.sc.gamma"),
        input_rule="any size", align_input=(2, 3, 65, 65),
        partial_aliases={"backbone": ("pretrained.",)}, source_flavours=("torchvision-imagenet-resnet",),
        # The 2018 DANet code kept the ImageNet classifier on the backbone (BaseNet did not set
        # `pretrained.fc = None`), so a checkpoint of that era may carry pretrained.fc.weight [1000, 2048] and .bias.
        ignored_keys=((r"pretrained\.fc\.(weight|bias)",
                       "drop: the backbone's ImageNet classifier, kept by the 2018 DANet code and never used by the "
                       "model"),),
        backbone_prefixes=("pretrained.", ""),
        recipe="paddle_impl/configs/danet_r101_cityscapes.yml",
        # PAM without the (N, HW, HW) map (layers.position_attention); equal to the reference (docs/danet.md)
        inference_cfg={"pam_impl": "efficient"},
    ),
    "pointrend": ModelSpec(
        name="pointrend", title="SemanticFPN+PointRend-R101",
        upstream="facebookresearch/detectron2 projects/PointRend point_rend/semantic_seg.py",
        torch_module="torch_ref.models.pointrend", paddle_module="paddle_impl.models.pointrend",
        official_format="detectron2-zoo",  # model_final_cf6ac1.pkl: {'model': {name: ndarray}, '__author__'}
        loss_terms=(("coarse", 1.0), ("point", 1.0)),  # loss_sem_seg (coarse x4) + loss_sem_seg_point, each weight 1
        head_prefixes=("sem_seg_head.",), head_lr_mult=1.0,  # detectron2: one lr for every parameter
        input_rule="H and W multiples of 32 (detectron2 pads to the FPN's size divisibility)",
        align_input=(2, 3, 64, 128),  # 32x64 then 64x128 cells: every cell refined at both subdivision steps
        partial_aliases={"backbone": ("backbone.bottom_up.",)}, source_flavours=("caffe2-msra-resnet",),
        # detectron2 from 2020-04 to 2021-02 saved its normalisation constants as persistent buffers
        ignored_keys=((r"pixel_(mean|std)", "drop: detectron2's input normalisation constants (persistent buffers "
                                            "in 2020 versions); segtwin normalises in the data pipeline"),),
        # FrozenBatchNorm2d keeps running_mean / running_var as buffers of those names on BOTH sides (it is not a
        # Paddle BatchNorm): undo the generic BatchNorm rename of the converter
        key_renames=((r"(.+\.norm)\._mean", r"\1.running_mean"), (r"(.+\.norm)\._variance", r"\1.running_var")),
        backbone_prefixes=("backbone.bottom_up.",),
        recipe="paddle_impl/configs/pointrend_r101_cityscapes_detectron2.yml",
        point_sampling=True,
    ),
    "hrnet_ocr_psa": ModelSpec(
        name="hrnet_ocr_psa", title="HRNetV2-W48+OCR+PSA",
        upstream="DeLightCMU/PSA semantic-segmentation/network/{ocrnet,hrnetv2,PSA}.py (NVIDIA's MscaleOCR)",
        torch_module="torch_ref.models.hrnet_ocr_psa", paddle_module="paddle_impl.models.hrnet_ocr_psa",
        official_format="nvidia",  # {'epoch', 'arch', 'state_dict' ('module.'), 'mean_iu' (numpy float64), ...}
        # MscaleOCR.two_scale_forward: main (joint prediction) + OCR_ALPHA 0.4 x aux (joint aux) +
        # SUPERVISED_MSCALE_WT 0.05 x each scale's own prediction (train_cityscapes_sota sets 0.05)
        loss_terms=(("main", 1.0), ("aux", 0.4), ("pred_05x", 0.05), ("pred_10x", 0.05)),
        loss_terms_by=(("mscale", False, (("main", 1.0), ("aux", 0.4))),),  # plain OCRNet: main + 0.4 x aux
        # NVIDIA's criterion is RMILoss; only the main term runs its RMI half (OCR_AUX_RMI False, and the scale
        # terms call it with do_rmi=False): the others are its sigmoid-BCE half alone
        official_loss={"main": {"type": "RMILoss"}, "aux": {"type": "RMILoss", "do_rmi": False},
                       "pred_05x": {"type": "RMILoss", "do_rmi": False},
                       "pred_10x": {"type": "RMILoss", "do_rmi": False}},
        head_prefixes=("ocr.", "scale_attn."), head_lr_mult=1.0,  # NVIDIA: one parameter group, one lr
        input_rule="any size", align_input=(2, 3, 96, 96),
        partial_aliases={"backbone": ("backbone.",)}, source_flavours=("hrnet-imagenet",),
        # DeLightCMU's / NVIDIA's loaders copy only the keys a file holds: a PSA-less HRNet (ImageNet, Mapillary)
        # leaves every PSA block at its own init
        init_keeps=((r"backbone\..+\.deattn\..+",
                     "PSA block: a PSA-less HRNet init (ImageNet, Mapillary) has none; as upstream's loader, the "
                     "block keeps its own initialisation"),),
        backbone_prefixes=("backbone.",),
        recipe="paddle_impl/configs/hrnet48_ocr_psa_cityscapes.yml",
    ),
}


def markdown_table() -> str:
    """The README's model table, generated from the specs (tests/test_specs.py keeps the README equal to it)."""
    lines = ["| model | title | reference whose checkpoints `torch_ref` loads | input rule | loss terms (weight) |",
             "|---|---|---|---|---|"]
    for name in model_names():
        s = SPECS[name]
        terms = ", ".join(f"{t} {w:g}" for t, w in s.loss_terms)
        lines.append(f"| `{name}` | {s.title} | `{s.upstream}` | {s.input_rule} | {terms} |")
    return "\n".join(lines)


def model_names() -> list:
    return sorted(SPECS)


def get_spec(name: str) -> ModelSpec:
    if isinstance(name, ModelSpec):
        return name
    try:
        return SPECS[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; registered: {', '.join(model_names())}") from None
