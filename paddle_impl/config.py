"""PaddleSeg-like YAML training configs.

    cfg = load_config("paddle_impl/configs/pspnet_r50_cityscapes.yml", {"iters": 100, "train_dataset.dataset_root": d})
    model = cfg.build_model(); train_set = cfg.build_dataset("train"); opt = cfg.build_optimizer(model)

Top-level keys (see docs/training.md for all of them)::

    batch_size iters seed train_dataset val_dataset model optimizer lr_scheduler loss
    log_iters eval_iters save_iters keep_checkpoints num_workers amp test_config

Every key is validated against ``SCHEMA``: an unknown key is an error naming the file and the key path, with the
closest valid key suggested (``pspnet.yml: unknown key 'optimiser' in <root>; did you mean 'optimizer'?``).
"""
from __future__ import annotations

import copy
import difflib
import json
import inspect
import os
import re
from typing import Any, Dict, Optional

import yaml

__all__ = ["Config", "ConfigError", "load_config", "parse_opts", "load_backbone", "SCHEMA", "DATASET_TYPES"]


class ConfigError(ValueError):
    """A config file is invalid; the message names the file and the key path."""


_NUM = (int, float)
_DATASET = {
    "type": str, "dataset_root": str, "split": str, "mode": str, "list_file": str, "label_dir": str,
    "reduce_zero_label": bool, "year": int, "transforms": list, "num_classes": int, "ignore_index": int,
}
_TEST = {"protocol": str, "is_slide": bool, "crop_size": (int, list), "stride": (int, list), "flip_horizontal": bool,
         "scales": (list, int, float), "base_size": int}
#: key -> python type(s) of the value, or a nested schema dict. Anything not here is rejected.
SCHEMA: Dict[str, Any] = {
    "batch_size": int, "iters": int, "seed": int,
    "train_dataset": _DATASET, "val_dataset": _DATASET,
    # model: `type` and the two weight files here; every other key is an argument of the model's builder, read off
    # its signature (alignment.specs.config_keys) once the type is known
    "model": {"type": str, "pretrained": str, "backbone_pretrained": str},
    "optimizer": {"type": str, "momentum": _NUM, "weight_decay": _NUM, "head_lr_mult": _NUM, "beta1": _NUM,
                  "beta2": _NUM, "epsilon": _NUM, "grad_clip": _NUM, "norm_decay_mult": _NUM,
                  "bias_decay_mult": _NUM},
    "lr_scheduler": {"type": str, "learning_rate": _NUM, "power": _NUM, "end_lr": _NUM, "milestones": list,
                     "step_size": int, "gamma": _NUM, "warmup_iters": int, "warmup_start_lr": _NUM},
    "loss": {"types": list, "coef": list},
    "log_iters": int, "eval_iters": int, "save_iters": int, "keep_checkpoints": int, "num_workers": int,
    "amp": bool, "save_dir": str,
    # test-time options of `segtwin eval` / `segtwin predict` (PaddleSeg's spelling + protocol/base_size; see
    # Config.test_options and docs/evaluation.md); `ms` holds the keys that differ for multi-scale (`--ms`)
    "test_config": dict(_TEST, ms=_TEST),
}
_REQUIRED = ("batch_size", "iters", "train_dataset", "model", "optimizer", "lr_scheduler")
DEFAULTS = {"seed": 0, "log_iters": 10, "eval_iters": 1000, "save_iters": 1000, "keep_checkpoints": 5,
            "num_workers": 0, "amp": False}
DATASET_TYPES = ("Cityscapes", "VOCSegmentation")


def _type_name(t) -> str:
    return " or ".join(x.__name__ for x in t) if isinstance(t, tuple) else t.__name__


def _model_schema(node: Any) -> Dict[str, Any]:
    """SCHEMA["model"] widened by the builder arguments of the model type named in `node` (when it is known)."""
    from alignment.specs import SPECS, config_keys

    schema = dict(SCHEMA["model"])
    mtype = node.get("type") if isinstance(node, dict) else None
    if isinstance(mtype, str) and mtype in SPECS:
        for key, want in config_keys(SPECS[mtype]).items():
            schema.setdefault(key, want)
    return schema


def _validate(node: Dict[str, Any], schema: Dict[str, Any], where: str, file: str) -> None:
    if not isinstance(node, dict):
        raise ConfigError(f"{file}: {where} must be a mapping, got {type(node).__name__}")
    for key, value in node.items():
        if key not in schema:
            close = difflib.get_close_matches(str(key), list(schema), n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(sorted(schema))}"
            raise ConfigError(f"{file}: unknown key {key!r} in {where}{hint}")
        want = schema[key]
        path = key if where == "<root>" else f"{where}.{key}"
        if where == "<root>" and key == "model":
            want = _model_schema(value)
        if isinstance(want, dict):
            _validate(value, want, path, file)
            continue
        if want is None:  # a builder argument without a typed default: the builder checks it
            continue
        ok = isinstance(value, want) and not (isinstance(value, bool) and want in (int, _NUM))
        if want is _NUM and isinstance(value, bool):
            ok = False
        if value is None and key in ("pretrained", "backbone_pretrained"):
            ok = True
        if not ok:
            raise ConfigError(f"{file}: {path} must be {_type_name(want)}, got {value!r}")


def _set_dotted(raw: Dict[str, Any], dotted: str, value: Any) -> None:
    """``raw[a][b][c] = value`` for ``"a.b.c"``; a part that is an integer indexes a list
    (``train_dataset.transforms.5.size``)."""
    node = raw
    parts = dotted.split(".")
    for i, p in enumerate(parts):
        last = i == len(parts) - 1
        if last and value is REMOVE:
            if isinstance(node, dict):
                node.pop(p, None)
            return
        if isinstance(node, list):
            if not p.isdigit() or int(p) >= len(node):
                raise ConfigError(f"override {dotted}: {'.'.join(parts[:i]) or '<root>'} is a list of {len(node)} "
                                  f"entries; {p!r} is not an index into it")
            if last:
                node[int(p)] = value
            else:
                node = node[int(p)]
        elif isinstance(node, dict):
            if last:
                node[p] = value
            else:
                node = node.setdefault(p, {})
        else:
            raise ConfigError(f"override {dotted}: {'.'.join(parts[:i])} is a {type(node).__name__}, not a mapping")


def _yaml_plain(value):
    """Tuples as lists, numpy scalars as numbers: what ``yaml.safe_dump`` writes."""
    if isinstance(value, dict):
        return {k: _yaml_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_yaml_plain(v) for v in value]
    return value.item() if hasattr(value, "item") and not isinstance(value, (int, float, str, bool)) else value


def _show_override(value) -> str:
    if value is REMOVE:
        return "null"
    return value if isinstance(value, str) else json.dumps(_yaml_plain(value))


#: an override value that removes the key (``--opts optimizer.momentum=null``)
REMOVE = object()


#: a number as people type it; YAML 1.1 reads ``1e-3`` (no dot) as a string
_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def parse_opts(items) -> Dict[str, Any]:
    """``["iters=100", "optimizer.type=adam", "train_dataset.transforms.5.size=[65, 65]"]`` -> dotted overrides;
    values are read as YAML (numbers, booleans, lists), ``1e-3`` as a number, anything else stays a string;
    ``null`` removes the key. The config's schema then checks each value's type and the key (with "did you
    mean")."""
    out: Dict[str, Any] = {}
    for item in items or []:
        key, sep, text = str(item).partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--opts {item!r}: expected KEY=VALUE (dotted key, e.g. optimizer.weight_decay=4e-5)")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            value = text
        if isinstance(value, str) and _NUMBER.match(value.strip()):
            value = float(value) if any(c in value for c in ".eE") else int(value)
        out[key.strip()] = REMOVE if value is None else value
    return out


class Config:
    """A validated config. ``raw`` is the plain dict (defaults filled in)."""

    def __init__(self, raw: Dict[str, Any], path: str = "<config>"):
        self.path = path
        #: the dotted overrides (``--opts``, ``--iters``, ...) applied on top of the file, for the record
        self.overrides: Dict[str, Any] = {}
        #: {key: reason} of the backbone keys ``model.backbone_pretrained`` did not hold (spec ``init_keeps``)
        self.init_kept: Dict[str, str] = {}
        self.file = os.path.basename(path)
        _validate(raw, SCHEMA, "<root>", self.file)
        for key in _REQUIRED:
            if key not in raw:
                raise ConfigError(f"{self.file}: missing required key {key!r}")
        for key, default in DEFAULTS.items():
            raw.setdefault(key, default)
        self.raw = raw
        for key in ("batch_size", "iters", "log_iters", "eval_iters", "save_iters", "keep_checkpoints"):
            if raw[key] <= 0:
                raise ConfigError(f"{self.file}: {key} must be positive, got {raw[key]}")
        if raw["num_workers"] < 0:
            raise ConfigError(f"{self.file}: num_workers must be >= 0, got {raw['num_workers']}")
        for section in ("train_dataset", "val_dataset"):
            if section in raw:
                t = raw[section].get("type")
                if t not in DATASET_TYPES:
                    raise ConfigError(f"{self.file}: {section}.type must be one of {list(DATASET_TYPES)}, got {t!r}")
                if "dataset_root" not in raw[section]:
                    raise ConfigError(f"{self.file}: missing required key {section}.dataset_root")
        from alignment.specs import SPECS, model_names
        mtype = raw["model"].get("type")
        if mtype not in SPECS:
            raise ConfigError(f"{self.file}: model.type must be one of {model_names()}, got {mtype!r}")
        for ms in (False, True):
            if ms and "ms" not in raw.get("test_config", {}):
                continue
            self.test_options(ms=ms)  # raises ConfigError naming the key
        if "learning_rate" not in raw["lr_scheduler"]:
            raise ConfigError(f"{self.file}: missing required key lr_scheduler.learning_rate")
        try:
            self.recipe
            self.build_lr()
        except ValueError as e:
            raise ConfigError(f"{self.file}: {e}") from None

    # ------------------------------------------------------------------------------------------------ properties
    @property
    def model_type(self) -> str:
        return self.raw["model"]["type"]

    @property
    def spec(self):
        """The model's spec (alignment.specs): loss terms, head parameter groups, custom ops, ..."""
        from alignment.specs import get_spec
        return get_spec(self.model_type)

    @property
    def num_classes(self) -> int:
        m = self.raw["model"]
        if "num_classes" in m:
            return int(m["num_classes"])
        ds = self.raw["train_dataset"]
        if "num_classes" in ds:
            return int(ds["num_classes"])
        n = int(self._dataset_class("train_dataset").num_classes)
        return n - 1 if ds.get("reduce_zero_label") else n

    @property
    def ignore_index(self) -> int:
        return int(self.raw["train_dataset"].get("ignore_index", 255))

    @property
    def recipe(self) -> Dict[str, Any]:
        """The resolved training recipe: ``optimizer``, ``lr_scheduler`` and ``loss`` with every default explicit,
        and ``iters`` (``alignment.recipe.resolve_recipe``; what ``segtwin align --config`` compares)."""
        from alignment.recipe import resolve_recipe
        return resolve_recipe(self.raw, self.spec)

    @property
    def loss_coefs(self) -> Dict[str, float]:
        """{term: coefficient} in the model's output order (defaults: the spec's loss_terms)."""
        return {t["name"]: t["coef"] for t in self.recipe["loss"]}

    def test_options(self, ms: bool = False) -> Dict[str, Any]:
        """Keyword arguments of ``engine.evaluator.evaluate`` / ``predict_logits`` from the optional ``test_config``
        section (``ms=True``: with ``test_config.ms`` laid over it); ``{}`` without the section.

        ``protocol`` (semseg | danet), ``is_slide`` (mode slide/whole), ``crop_size`` / ``stride`` (an int, or
        ``[W, H]`` in PaddleSeg's order), ``flip_horizontal``, ``scales`` (a number or a list), ``base_size``."""
        from .engine.evaluator import PROTOCOLS
        tc = dict(self.raw.get("test_config") or {})
        where = "test_config"
        sub = tc.pop("ms", None)
        if ms:
            if sub is None:
                raise ConfigError(f"{self.file}: multi-scale evaluation asked for, but the config has no "
                                  f"test_config.ms section")
            tc.update(sub)
            where = "test_config(.ms)"
        kw: Dict[str, Any] = {}
        protocol = tc.get("protocol", "semseg")
        if protocol not in PROTOCOLS:
            raise ConfigError(f"{self.file}: {where}.protocol must be one of {list(PROTOCOLS)}, got {protocol!r}")
        if "protocol" in tc:
            kw["protocol"] = protocol

        def wh(key):  # PaddleSeg writes sizes as [W, H]; the evaluator takes (H, W)
            v = tc[key]
            if isinstance(v, list):
                if len(v) != 2 or not all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in v):
                    raise ConfigError(f"{self.file}: {where}.{key} must be a positive int or [W, H], got {v!r}")
                return (v[1], v[0])
            if isinstance(v, bool) or v <= 0:
                raise ConfigError(f"{self.file}: {where}.{key} must be a positive int or [W, H], got {v!r}")
            return v

        if "crop_size" in tc:
            kw["crop"] = wh("crop_size")
        if "stride" in tc:
            kw["stride"] = wh("stride")
        if tc.get("is_slide"):
            if "crop_size" not in tc:
                raise ConfigError(f"{self.file}: {where}.is_slide needs {where}.crop_size")
            kw["mode"] = "slide"
        elif "is_slide" in tc:
            kw["mode"] = "whole"
        if protocol == "danet" and "crop_size" not in tc:
            raise ConfigError(f"{self.file}: {where}.protocol danet needs {where}.crop_size")
        if "flip_horizontal" in tc:
            kw["flip"] = bool(tc["flip_horizontal"])
        if "scales" in tc:
            scales = tc["scales"] if isinstance(tc["scales"], list) else [tc["scales"]]
            if not scales or not all(isinstance(x, _NUM) and not isinstance(x, bool) and x > 0 for x in scales):
                raise ConfigError(f"{self.file}: {where}.scales must be positive numbers, got {tc['scales']!r}")
            kw["scales"] = tuple(float(x) for x in scales)
        if "base_size" in tc:
            if tc["base_size"] <= 0:
                raise ConfigError(f"{self.file}: {where}.base_size must be positive, got {tc['base_size']!r}")
            kw["base_size"] = int(tc["base_size"])
        return kw

    def to_yaml(self) -> str:
        """The config as it runs (file + overrides + defaults) as YAML, headed by where it came from: what
        ``segtwin train`` saves as ``SAVE_DIR/config.yml`` (``segtwin train --config SAVE_DIR/config.yml`` runs it
        again)."""
        head = [f"# resolved config of {os.path.abspath(self.path)} (defaults filled in)"]
        if self.overrides:
            shown = " ".join(f"{k}={_show_override(v)}" for k, v in self.overrides.items())
            head.append(f"# overrides: {shown}")
        return "\n".join(head) + "\n" + yaml.safe_dump(_yaml_plain(self.raw), sort_keys=False)

    # ------------------------------------------------------------------------------------------------ builders
    def build_model(self, defaults: Optional[Dict[str, Any]] = None):
        """``paddle_impl.build_model(model.type, num_classes=..., <other model keys>)``, with ``defaults`` (model
        keys) filling in keys the ``model`` section does not set (``segtwin eval``/``predict``/``export`` pass the
        spec's ``inference_cfg`` through ``engine._cli.build_model``; the trainer passes none); ``model.pretrained`` (a
        full-model .pdparams) is loaded strictly when set; ``model.backbone_pretrained`` (e.g. ImageNet weights
        converted with ``segtwin convert --partial backbone``) must hold every key under the spec's backbone prefixes
        (``partial_aliases['backbone']``: the trunk) with the right shape and nothing else, except the spec's
        ``init_keeps`` (HRNet's PSA blocks), which keep their initialisation and are listed in ``self.init_kept``."""
        import paddle_impl
        from .checkpoint import read_state_file, strict_load
        cfg = dict(defaults or {})
        cfg.update({k: v for k, v in self.raw["model"].items()
                    if k not in ("type", "pretrained", "backbone_pretrained", "num_classes")})
        try:
            model = paddle_impl.build_model(self.model_type, num_classes=self.num_classes, **cfg)
        except TypeError as e:
            raise ConfigError(f"{self.file}: bad model keys for {self.model_type}: {e}") from None
        pretrained = self.raw["model"].get("pretrained")
        if pretrained:
            if not os.path.isfile(pretrained):
                raise FileNotFoundError(f"{self.file}: model.pretrained {pretrained} does not exist")
            strict_load(model, read_state_file(pretrained), source=pretrained)
        backbone = self.raw["model"].get("backbone_pretrained")
        if backbone:
            if not os.path.isfile(backbone):
                raise FileNotFoundError(f"{self.file}: model.backbone_pretrained {backbone} does not exist")
            trunk = self.spec.partial_aliases.get("backbone")
            if not trunk:
                raise ConfigError(f"{self.file}: model.backbone_pretrained: model {self.model_type!r} names no "
                                  f"backbone (its spec has no partial_aliases['backbone'])")
            self.init_kept = load_backbone(model, read_state_file(backbone), source=backbone,
                                           backbone_prefixes=trunk, keeps=self.spec.init_keeps)
        return model

    def _dataset_class(self, section: str):
        from . import datasets
        return getattr(datasets, self.raw[section]["type"])

    def build_transforms(self, split: str, seed=None):
        """The split's transform list (``paddle_impl.transforms.build_transforms``), finished with ``Normalize`` and
        ``ToCHW`` when the list does not contain them."""
        from .transforms import build_transforms
        section = self._section(split)
        specs = list(self.raw[section].get("transforms", []))
        names = [s.get("type") if isinstance(s, dict) else None for s in specs]
        for i, s in enumerate(specs):
            if not isinstance(s, dict):
                raise ConfigError(f"{self.file}: {section}.transforms[{i}] must be a mapping with a 'type', got {s!r}")
        if "Normalize" not in names:
            specs.append({"type": "Normalize"})
        if "ToCHW" not in names:
            specs.append({"type": "ToCHW"})
        try:
            return build_transforms(specs, seed=seed)
        except ValueError as e:
            raise ConfigError(f"{self.file}: {section}.transforms: {e}") from None

    def _section(self, split: str) -> str:
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        section = f"{split}_dataset"
        if section not in self.raw:
            raise ConfigError(f"{self.file}: no {section} section")
        return section

    def build_dataset(self, split: str, root: Optional[str] = None, seed=None):
        """The ``train``/``val`` dataset of the config (``root`` replaces ``dataset_root``)."""
        section = self._section(split)
        spec = self.raw[section]
        root = os.fspath(root) if root is not None else spec["dataset_root"]
        if not os.path.isdir(root):
            raise FileNotFoundError(f"{self.file}: {section}.dataset_root {os.path.abspath(root)} does not exist "
                                    f"(pass --data-root DIR or fix the config)")
        cls = self._dataset_class(section)
        kwargs = {"split": spec.get("split", split)}
        for key in ("mode", "list_file", "label_dir", "reduce_zero_label", "year"):
            if key in spec:
                params = inspect.signature(cls.__init__).parameters
                if key not in params:
                    raise ConfigError(f"{self.file}: {section}.{key} is not supported by {cls.__name__} "
                                      f"(its arguments: {', '.join(p for p in params if p != 'self')})")
                kwargs[key] = spec[key]
        return cls(root, transforms=self.build_transforms(split, seed=seed), **kwargs)

    # The three recipe builders below are the ones `segtwin align --config` calls for the Paddle side: each looks its
    # function up on the module at call time, so the trainer and the alignment always run the same code.
    def build_lr(self, iters: Optional[int] = None):
        """The lr schedule (``paddle_impl.schedule.build_schedule``) over ``iters`` (default: the config's)."""
        from . import schedule
        return schedule.build_schedule(self.raw["lr_scheduler"], int(iters or self.raw["iters"]))

    def build_optimizer(self, model, base_lr: Optional[float] = None):
        """``paddle_impl.optim.build_optimizer`` with the resolved ``optimizer`` section: SGD-momentum, Adam or
        AdamW; parameter groups from the spec's ``head_prefixes`` (x ``head_lr_mult``: default the spec's for SGD,
        1 for Adam/AdamW) and the weight-decay multipliers of norm parameters and biases."""
        from alignment.recipe import resolve_optimizer

        from . import optim
        lr = float(self.raw["lr_scheduler"]["learning_rate"] if base_lr is None else base_lr)
        return optim.build_optimizer(model, resolve_optimizer(self.raw["optimizer"], self.spec), lr,
                                     self.spec.head_prefixes)

    def build_loss(self):
        """``paddle_impl.losses.build_loss`` of the config's ``loss`` section (default: the model's official
        criterion), ignoring the training set's ``ignore_index``."""
        from . import losses
        return losses.build_loss(self.model_type, self.raw.get("loss"), self.ignore_index, self.raw.get("model"))


def load_backbone(model, state_dict, source: str = "<state_dict>", backbone_prefixes=(), keeps=()) -> dict:
    """Load every parameter/buffer of ``model`` under ``backbone_prefixes`` (the spec's ``--partial backbone``
    prefixes: the ImageNet-initialised trunk) from ``state_dict``, strictly on those keys (none missing, none
    unexpected, same shapes); everything else (heads, PointRend's FPN) keeps its initialisation.

    keeps: the spec's ``init_keeps`` ((regex, reason), ...): trunk keys the file may lack (HRNet's PSA blocks in a
    PSA-less HRNet init); those keep the model's own values. Returns {key: reason} of every key kept that way."""
    import re

    from .checkpoint import check_keys
    trunk = tuple(backbone_prefixes)
    own = {k: v for k, v in model.state_dict().items() if k.startswith(trunk)}
    kept = {}
    for k in own:
        if k not in state_dict:
            reason = next((why for pattern, why in keeps if re.fullmatch(pattern, k)), None)
            if reason is not None:
                kept[k] = reason
    check_keys({k: v for k, v in own.items() if k not in kept}, state_dict, source)
    full = dict(model.state_dict())  # the heads load their own values: no "skip loading" warnings
    full.update(state_dict)
    model.set_state_dict(full)
    return kept


def load_config(path, overrides: Optional[Dict[str, Any]] = None) -> Config:
    """Read and validate a YAML config. ``overrides``: ``{"iters": 10, "train_dataset.dataset_root": "d"}``
    (dotted keys), applied before validation."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path} does not exist")
    with open(path, encoding="utf-8") as f:
        try:
            raw = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise ConfigError(f"{os.path.basename(path)}: not valid YAML: {e}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{os.path.basename(path)}: the top level must be a mapping")
    raw = copy.deepcopy(raw)
    for key, value in (overrides or {}).items():
        if value is not None:
            _set_dotted(raw, key, value)
    cfg = Config(raw, path)
    cfg.overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    return cfg
