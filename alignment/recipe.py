"""The training recipe of a config, resolved into explicit numbers (framework-neutral: imports neither framework).

A config's ``optimizer``, ``lr_scheduler`` and ``loss`` sections leave most values to defaults. Both twins build
from the RESOLVED sections this module returns, so a default is written down once, here, and what the trainer runs
and what ``segtwin align --config`` compares start from the same numbers:

    opt = resolve_optimizer({"type": "sgd", "weight_decay": 4e-5}, spec)
    # {'type': 'sgd', 'momentum': 0.9, 'weight_decay': 4e-05, 'head_lr_mult': 10.0, 'grad_clip': None,
    #  'norm_decay_mult': 1.0, 'bias_decay_mult': 1.0}
    sched = resolve_schedule({"type": "poly", "learning_rate": 0.01})
    loss = resolve_loss(None, spec)            # the model's official criterion, one entry per loss term

Every value is checked (type, range, keys that do not apply to the chosen type); a bad one raises ``RecipeError``
naming the key. A type without a twin on both sides is an error, never a fallback.
"""
from __future__ import annotations

import difflib
from typing import Any, Dict, List, Mapping, Optional

__all__ = ["RecipeError", "OPTIMIZERS", "SCHEDULES", "LOSS_TYPES", "resolve_optimizer", "resolve_schedule",
           "resolve_loss", "resolve_recipe", "official_recipe"]


class RecipeError(ValueError):
    """A recipe value is invalid or has no twin; the message names the key."""


#: optimizer type -> its own keys with their defaults (``momentum`` is an alias of ``sgd``: SGD with momentum)
OPTIMIZERS: Dict[str, Dict[str, Any]] = {
    "sgd": {"momentum": 0.9, "weight_decay": 1e-4},
    "adam": {"beta1": 0.9, "beta2": 0.999, "epsilon": 1e-8, "weight_decay": 0.0},
    "adamw": {"beta1": 0.9, "beta2": 0.999, "epsilon": 1e-8, "weight_decay": 0.01},
}
_OPT_ALIASES = {"momentum": "sgd"}
#: keys every optimizer type takes. head_lr_mult: None = the spec's multiplier for SGD (the papers' x10 heads), 1 for
#: Adam/AdamW. norm/bias_decay_mult scale the weight decay of normalisation-layer parameters and of the other biases.
_OPT_COMMON = {"head_lr_mult": None, "grad_clip": None, "norm_decay_mult": 1.0, "bias_decay_mult": 1.0}

#: schedule type -> its own keys with their defaults (``learning_rate`` is required; warmup keys apply to all)
SCHEDULES: Dict[str, Dict[str, Any]] = {
    "poly": {"power": 0.9, "end_lr": 0.0},
    "step": {"milestones": None, "step_size": None, "gamma": 0.1},
    "const": {},
}
_SCHED_ALIASES = {"polynomialdecay": "poly", "polynomial": "poly", "constant": "const"}
_SCHED_COMMON = {"warmup_iters": 0, "warmup_start_lr": 0.0}

#: loss type -> its keys with their defaults (ignore_index None: the dataset's)
LOSS_TYPES: Dict[str, Dict[str, Any]] = {
    "CrossEntropyLoss": {"avg": "valid", "weight": None, "ignore_index": None},
    "OhemCrossEntropyLoss": {"thresh": 0.7, "min_kept": 10000, "ignore_index": None},
    # NVIDIA's RMILoss (loss/rmi.py): lambda x sigmoid-BCE over the one-hot + (1 - lambda) x RMI lower bound;
    # do_rmi False: the BCE half alone, unweighted (NVIDIA's criterion(..., do_rmi=False))
    "RMILoss": {"do_rmi": True, "rmi_radius": 3, "rmi_pool_way": 1, "rmi_pool_size": 4, "rmi_pool_stride": 4,
                "loss_weight_lambda": 0.5, "lambda_way": 1, "ignore_index": None},
}


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _unknown(keys, allowed, where: str) -> None:
    bad = sorted(set(keys) - set(allowed))
    if bad:
        close = difflib.get_close_matches(str(bad[0]), list(allowed), n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise RecipeError(f"{where}: key {bad[0]!r} does not apply here{hint} (accepted: {', '.join(sorted(allowed))})")


def _num(d: dict, key: str, where: str, lo: Optional[float] = None, hi: Optional[float] = None,
         lo_open: bool = False, hi_open: bool = False) -> None:
    v = d[key]
    if v is None:
        return
    if not _is_num(v):
        raise RecipeError(f"{where}.{key} must be a number, got {v!r}")
    v = float(v)
    if lo is not None and (v < lo or (lo_open and v == lo)):
        raise RecipeError(f"{where}.{key} must be {'>' if lo_open else '>='} {lo:g}, got {v:g}")
    if hi is not None and (v > hi or (hi_open and v == hi)):
        raise RecipeError(f"{where}.{key} must be {'<' if hi_open else '<='} {hi:g}, got {v:g}")
    d[key] = v


def _kind(section: Mapping[str, Any], known, aliases, default: str, where: str) -> str:
    raw = section.get("type", default)
    kind = str(raw).lower()
    kind = aliases.get(kind, kind)
    if kind not in known:
        raise RecipeError(f"{where}.type {raw!r} has no twin in torch_ref and paddle_impl; known: "
                          f"{', '.join(sorted(set(known) | set(aliases)))}")
    return kind


def _given(section) -> Dict[str, Any]:
    """The keys a section sets (a null value counts as not set)."""
    return {k: v for k, v in dict(section or {}).items() if v is not None}


def resolve_optimizer(section: Optional[Mapping[str, Any]], spec) -> Dict[str, Any]:
    """Every hyper-parameter of the optimizer, explicit (see the module doc); ``spec``: the model's spec."""
    section = _given(section)
    kind = _kind(section, OPTIMIZERS, _OPT_ALIASES, "sgd", "optimizer")
    own = OPTIMIZERS[kind]
    _unknown(set(section) - {"type"}, set(own) | set(_OPT_COMMON), f"optimizer ({kind})")
    out: Dict[str, Any] = {"type": kind, **own, **_OPT_COMMON}
    out.update({k: v for k, v in section.items() if k != "type"})
    if out["head_lr_mult"] is None:
        out["head_lr_mult"] = float(spec.head_lr_mult) if kind == "sgd" else 1.0
    _num(out, "weight_decay", "optimizer", lo=0.0)
    _num(out, "head_lr_mult", "optimizer", lo=0.0)
    _num(out, "grad_clip", "optimizer", lo=0.0, lo_open=True)
    _num(out, "norm_decay_mult", "optimizer", lo=0.0)
    _num(out, "bias_decay_mult", "optimizer", lo=0.0)
    if kind == "sgd":
        _num(out, "momentum", "optimizer", lo=0.0, hi=1.0, hi_open=True)
    else:
        _num(out, "beta1", "optimizer", lo=0.0, hi=1.0, hi_open=True)
        _num(out, "beta2", "optimizer", lo=0.0, hi=1.0, hi_open=True)
        _num(out, "epsilon", "optimizer", lo=0.0, lo_open=True)
    return out


def resolve_schedule(section: Mapping[str, Any], learning_rate: Optional[float] = None) -> Dict[str, Any]:
    """Every value of the lr schedule, explicit. ``learning_rate`` is used when the section has none."""
    section = _given(section)
    kind = _kind(section, SCHEDULES, _SCHED_ALIASES, "poly", "lr_scheduler")
    own = SCHEDULES[kind]
    _unknown(set(section) - {"type", "learning_rate"}, set(own) | set(_SCHED_COMMON), f"lr_scheduler ({kind})")
    out: Dict[str, Any] = {"type": kind, "learning_rate": section.get("learning_rate", learning_rate), **own,
                           **_SCHED_COMMON}
    out.update({k: v for k, v in section.items() if k not in ("type", "learning_rate")})
    if out["learning_rate"] is None:
        raise RecipeError("lr_scheduler.learning_rate is missing")
    _num(out, "learning_rate", "lr_scheduler", lo=0.0)
    _num(out, "warmup_start_lr", "lr_scheduler", lo=0.0)
    w = out["warmup_iters"]
    if not isinstance(w, int) or isinstance(w, bool) or w < 0:
        raise RecipeError(f"lr_scheduler.warmup_iters must be an integer >= 0, got {w!r}")
    if kind == "poly":
        _num(out, "power", "lr_scheduler", lo=0.0)
        _num(out, "end_lr", "lr_scheduler", lo=0.0)
    if kind == "step":
        _num(out, "gamma", "lr_scheduler", lo=0.0)
        ms, ss = out["milestones"], out["step_size"]
        if (ms is None) == (ss is None):
            raise RecipeError("lr_scheduler (step) needs exactly one of milestones (a list of iterations) or "
                              "step_size")
        if ss is not None and (not isinstance(ss, int) or isinstance(ss, bool) or ss <= 0):
            raise RecipeError(f"lr_scheduler.step_size must be a positive integer, got {ss!r}")
        if ms is not None:
            if (not isinstance(ms, (list, tuple)) or not all(isinstance(m, int) and not isinstance(m, bool)
                                                             for m in ms) or list(ms) != sorted(ms)):
                raise RecipeError(f"lr_scheduler.milestones must be increasing integers, got {ms!r}")
            out["milestones"] = [int(m) for m in ms]
    return out


def _loss_entry(entry, where: str) -> Dict[str, Any]:
    if isinstance(entry, str):
        entry = {"type": entry}
    if not isinstance(entry, Mapping) or "type" not in entry:
        raise RecipeError(f"{where} must be a loss type name or a mapping with a 'type' key, got {entry!r}")
    name = entry["type"]
    if name not in LOSS_TYPES:
        close = difflib.get_close_matches(str(name), list(LOSS_TYPES), n=1, cutoff=0.4)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise RecipeError(f"{where}: unknown loss type {name!r}{hint} (known: {', '.join(sorted(LOSS_TYPES))})")
    own = LOSS_TYPES[name]
    _unknown(set(entry) - {"type"}, own, f"{where} ({name})")
    out = {"type": name, **own, **{k: v for k, v in entry.items() if k != "type"}}
    if name == "CrossEntropyLoss":
        if out["avg"] not in ("valid", "all"):
            raise RecipeError(f"{where}.avg must be 'valid' or 'all', got {out['avg']!r}")
        if out["weight"] is not None and (not isinstance(out["weight"], (list, tuple))
                                          or not all(_is_num(w) and w >= 0 for w in out["weight"])):
            raise RecipeError(f"{where}.weight must be a list of class weights >= 0, got {out['weight']!r}")
    elif name == "RMILoss":
        if not isinstance(out["do_rmi"], bool):
            raise RecipeError(f"{where}.do_rmi must be true or false, got {out['do_rmi']!r}")
        for key, allowed in (("rmi_radius", range(1, 11)), ("rmi_pool_way", (0, 1, 2)), ("lambda_way", (0, 1))):
            if not isinstance(out[key], int) or isinstance(out[key], bool) or out[key] not in allowed:
                raise RecipeError(f"{where}.{key} must be one of {list(allowed)}, got {out[key]!r}")
        for key in ("rmi_pool_size", "rmi_pool_stride"):
            if not isinstance(out[key], int) or isinstance(out[key], bool) or out[key] < 1:
                raise RecipeError(f"{where}.{key} must be an integer >= 1, got {out[key]!r}")
        if out["rmi_pool_size"] != out["rmi_pool_stride"]:
            raise RecipeError(f"{where}: rmi_pool_size ({out['rmi_pool_size']}) must equal rmi_pool_stride "
                              f"({out['rmi_pool_stride']}), as NVIDIA's RMILoss requires")
        _num(out, "loss_weight_lambda", where, lo=0.0, hi=1.0)
    else:
        _num(out, "thresh", where, lo=0.0, hi=1.0)
        m = out["min_kept"]
        if not isinstance(m, int) or isinstance(m, bool) or m < 0:
            raise RecipeError(f"{where}.min_kept must be an integer >= 0, got {m!r}")
    if out["ignore_index"] is not None and (not isinstance(out["ignore_index"], int)
                                            or isinstance(out["ignore_index"], bool)):
        raise RecipeError(f"{where}.ignore_index must be an integer, got {out['ignore_index']!r}")
    return out


def resolve_loss(section: Optional[Mapping[str, Any]], spec,
                 model_cfg: Optional[Mapping[str, Any]] = None) -> List[Dict[str, Any]]:
    """One entry per loss term of the model, in its output order: ``{"name", "coef", "type", <type's keys>}``.

    ``section`` is PaddleSeg's ``{types: [...], coef: [...]}``: one type with several coefs is repeated for every
    coef; ``coef`` defaults to the spec's weights. ``None``: the model's official criterion (the spec's
    ``official_loss`` types, else cross-entropy averaged over the valid pixels for every term, the spec's weights).
    ``model_cfg``: the model's config, for a model whose loss terms depend on it (spec ``loss_terms_by``)."""
    terms = list(spec.loss_terms_for(model_cfg))
    if section is None and spec.official_loss:
        section = {"types": [dict(spec.official_loss[t]) for t, _ in terms]}
    section = dict(section or {})
    _unknown(set(section), {"types", "coef"}, "loss")
    coefs = section.get("coef", [w for _, w in terms])
    if not isinstance(coefs, (list, tuple)) or not all(_is_num(c) for c in coefs):
        raise RecipeError(f"loss.coef must be a list of numbers, got {coefs!r}")
    if len(coefs) != len(terms):
        raise RecipeError(f"loss.coef has {len(coefs)} values, model {spec.name} has {len(terms)} loss terms "
                          f"({', '.join(t for t, _ in terms)})")
    types = section.get("types", ["CrossEntropyLoss"])
    if not isinstance(types, (list, tuple)) or not types:
        raise RecipeError(f"loss.types must be a non-empty list, got {types!r}")
    if len(types) == 1:
        types = list(types) * len(terms)
    if len(types) != len(terms):
        raise RecipeError(f"loss.types has {len(types)} entries, model {spec.name} has {len(terms)} loss terms "
                          f"({', '.join(t for t, _ in terms)}); give one type for all or one per term")
    return [{"name": t, "coef": float(c), **_loss_entry(e, f"loss.types[{i}]")}
            for i, ((t, _), c, e) in enumerate(zip(terms, coefs, types))]


def resolve_recipe(raw: Mapping[str, Any], spec) -> Dict[str, Any]:
    """The resolved ``optimizer``, ``lr_scheduler`` and ``loss`` of a config dict, plus its ``iters``."""
    return {"optimizer": resolve_optimizer(raw.get("optimizer"), spec),
            "lr_scheduler": resolve_schedule(raw.get("lr_scheduler") or {}),
            "loss": resolve_loss(raw.get("loss"), spec, raw.get("model")),
            "iters": int(raw["iters"])}


def official_recipe(spec) -> str:
    """Path of the config holding the model's official training recipe (the spec's ``recipe``)."""
    if not spec.recipe:
        raise RecipeError(f"model {spec.name} has no official recipe config (spec field 'recipe'); pass --config")
    return spec.recipe
