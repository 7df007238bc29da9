"""Official checkpoint -> `.pdparams` for the Paddle twin, verified by a strict reload.

    report = convert("pspnet", "train_epoch_200.pth", "pspnet.pdparams", report="convert.json")
    report = convert("pspnet", "resnet50_v2.pth", "init.pdparams", partial=("backbone",), cfg={"num_classes": 21})

Steps: read (memory-mapped, weights_only) -> config from the weights (cfg overrides) -> torch_ref model on the meta
device (module types: what to transpose) and the Paddle twin (target keys and shapes) -> plan one action per key ->
any unused / missing / mis-shaped / duplicate key is a ConversionError naming every one -> stream the arrays into a
temporary file next to dst -> free the source -> reload the file strictly into the twin -> rename it to dst.
dst therefore appears only complete and verified; an existing dst is never replaced unless overwrite=True.

Memory: the source stays memory-mapped and each array is serialised as it is produced, so the peak is about one
checkpoint (the mapped source) during the write plus the twin and the reloaded arrays during the check.
"""
from __future__ import annotations

import json
import os
import re
import sys
import time
import warnings
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from alignment.logutil import quiet_imports
from alignment.utils import atomic_path, atomic_write

from .memory import MemoryMeter, SourcePageReleaser, rss_bytes
from .keymap import ERROR_ACTIONS, KeyAction, get_keymap, materialize, plan_conversion
from .writer import write_pdparams

__all__ = ["convert", "ConversionError", "ConversionReport"]


class ConversionError(ValueError):
    """The checkpoint does not fit the Paddle twin (or dst is in the way). The message names every offending key;
    `report` (when planning got that far) holds the full per-key plan."""

    def __init__(self, message: str, report: Optional["ConversionReport"] = None):
        super().__init__(" ".join(str(message).split()))
        self.report = report


@dataclass
class ConversionReport:
    """What the converter did: one row per key, plus where, what config, and how much memory."""
    model: str
    src: str
    dst: Optional[str]
    cfg: dict
    cfg_inferred: dict
    cfg_overrides: dict
    cfg_note: Optional[str]
    partial: list
    partial_prefixes: list
    flavour: Optional[str]
    info: dict
    rows: list = field(default_factory=list)
    memory: dict = field(default_factory=dict)
    seconds: Optional[float] = None
    phases: dict = field(default_factory=dict)
    ok: bool = False
    error: Optional[str] = None

    @property
    def summary(self) -> dict:
        """Counts of rows per action."""
        return dict(Counter(r.action for r in self.rows))

    def rows_with(self, *actions: str) -> list:
        return [r for r in self.rows if r.action in actions]

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "ok": self.ok,
            "error": self.error,
            "src": self.src,
            "dst": self.dst,
            "cfg": self.cfg,
            "cfg_inferred": self.cfg_inferred,
            "cfg_overrides": self.cfg_overrides,
            "cfg_note": self.cfg_note,
            "partial": self.partial,
            "partial_prefixes": self.partial_prefixes,
            "flavour": self.flavour,
            "summary": self.summary,
            "info": self.info,
            "memory": self.memory,
            "seconds": self.seconds,
            "phases_seconds": self.phases,
            "rows": [r.to_dict() for r in self.rows],
        }

    def to_json(self, path) -> Path:
        """Write the report as JSON (atomically) and return the path."""
        path = Path(path)
        with atomic_write(path) as f:
            json.dump(self.to_dict(), f, indent=1)
            f.write("\n")
        return path


# --------------------------------------------------------------------------------------------------------------------
# helpers


def _import_paddle():
    """`import paddle` without letting it reconfigure the root logger (it adds a handler and sets INFO)."""
    (paddle,) = quiet_imports("paddle")
    return paddle


def _paddle_dtype_name(dtype) -> str:
    return str(dtype).replace("paddle.", "")


def _torch_dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def _group(rows: Sequence[KeyAction]) -> str:
    parts = []
    for action, label in (("unused", "unused source keys"), ("missing", "missing twin keys"),
                          ("mis-shaped", "mis-shaped keys"), ("duplicate", "duplicate targets")):
        sel = [r for r in rows if r.action == action]
        if not sel:
            continue
        if action == "unused":
            names = [r.source + (f" (as {r.target})" if r.target and r.target != r.source else "") for r in sel]
        elif action == "missing":
            names = []
            for r in sel:
                m = re.search(r"torch_ref key '([^']+)'", r.reason)
                names.append(r.target + (f" (torch: {m.group(1)})" if m else ""))
        elif action == "mis-shaped":
            names = [f"{r.source} {list(r.source_shape)} -> {r.target} {list(r.target_shape)}" for r in sel]
        else:
            names = [f"{r.source} -> {r.target}" for r in sel]
        parts.append(f"{len(sel)} {label}: {', '.join(names)}")
    return "; ".join(parts)


class _CoveredKeys:
    """View of a Paddle layer restricted to the keys a partial conversion fills, for `strict_load`."""

    def __init__(self, layer, keys):
        self._layer = layer
        self._keys = list(keys)

    def state_dict(self):
        full = self._layer.state_dict()
        return OrderedDict((k, full[k]) for k in self._keys)

    def set_state_dict(self, state_dict):
        missing, unexpected = self._layer.set_state_dict(state_dict)
        keys = set(self._keys)
        return [k for k in missing if k in keys], list(unexpected)


_TWIN_SIGNATURES: dict = {}


def _twin_signature(paddle_impl, name: str, cfg: dict) -> tuple:
    """(twin or None, {key: shape}, {key: dtype}) of the Paddle twin `name` built with `cfg`."""
    cache_key = (name, json.dumps(cfg, sort_keys=True, default=repr))
    if cache_key in _TWIN_SIGNATURES:
        shapes, dtypes = _TWIN_SIGNATURES[cache_key]
        return None, OrderedDict(shapes), dict(dtypes)
    twin = paddle_impl.build_model(name, **cfg)
    sd = twin.state_dict()
    shapes = OrderedDict((k, tuple(int(s) for s in v.shape)) for k, v in sd.items())
    dtypes = {k: _paddle_dtype_name(v.dtype) for k, v in sd.items()}
    _TWIN_SIGNATURES[cache_key] = (tuple(shapes.items()), tuple(dtypes.items()))
    return twin, shapes, dtypes


def _resolve_cfg(name, keymap, view, cfg, partial) -> tuple:
    """(cfg used, cfg inferred, explicit cfg, note). Explicit cfg wins over what the checkpoint implies; a value the
    checkpoint cannot tell is a ConversionError naming the `--cfg` option (unless the conversion is partial)."""
    from alignment.specs import ConfigInferenceError, get_spec

    overrides = dict(cfg or {})
    note = None
    try:
        full = get_spec(name).infer_config(view, overrides)
        inferred = {k: v for k, v in full.items() if k not in overrides}
    except ConfigInferenceError as e:
        if not partial:
            raise ConversionError(f"{name}: {e}") from None
        note = f"config not inferable from the checkpoint ({e})"
        inferred = {}
    except (KeyError, ValueError) as e:
        note = f"config not inferable from the checkpoint ({e.args[0] if e.args else e})"
        inferred = {}
    if note is not None:
        shapes = {k: tuple(v.shape) for k, v in view.items()}
        inferred = dict(keymap.infer_partial_config(shapes)) if keymap.infer_partial_config else {}
    return {**inferred, **overrides}, inferred, overrides, note


def _progress(enabled, total: int, desc: str):
    if enabled == "auto":
        enabled = sys.stderr.isatty() or total > 200
    if not enabled:
        return None
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit="key", file=sys.stderr, leave=False, dynamic_ncols=True)


# --------------------------------------------------------------------------------------------------------------------


def convert(name: str, src, dst, partial: Sequence[str] = (), report=None, cfg: Optional[dict] = None, *,
            overwrite: bool = False, progress: Any = False) -> ConversionReport:
    """Convert the official checkpoint `src` of model `name` into `dst` (.pdparams) and verify it.

    partial: twin-key prefixes the checkpoint is expected to cover (aliases such as "backbone" expand per model);
    twin keys outside them keep their initialisation (action keep-init), keys inside them must all be filled.
    report: path for the JSON report (also written when planning finds errors). cfg: overrides of the config read
    off the checkpoint (e.g. {"num_classes": 21}). overwrite: allow replacing an existing dst. progress: True,
    False or "auto" (a tqdm bar on stderr when it is a TTY or there are more than 200 keys).

    Raises ConversionError (unused / missing / mis-shaped keys, dst exists, bad cfg), CheckpointError (unreadable
    or refused source) and paddle_impl.checkpoint.StateDictMismatch (the written file fails the strict reload).
    """
    t0 = time.perf_counter()
    try:
        keymap = get_keymap(name)
    except KeyError as e:
        raise ConversionError(str(e.args[0])) from None
    src, dst = Path(src), Path(dst)
    if dst.is_dir():
        raise ConversionError(f"{dst} is a directory; give the output .pdparams file")
    if dst.exists() and not overwrite:
        raise ConversionError(f"{dst} exists; refusing to overwrite it (pass --overwrite / overwrite=True)")
    if src.exists() and dst.exists() and os.path.samefile(src, dst):
        raise ConversionError(f"{dst} is the source checkpoint itself; write the .pdparams elsewhere")
    partial = tuple(partial or ())
    prefixes = keymap.expand_partial(partial)

    import torch

    paddle = _import_paddle()  # before paddle_impl, which imports paddle
    import paddle_impl
    import torch_ref

    meter = MemoryMeter()  # after the framework imports: their memory is not the conversion's
    phases, phase_rss = {}, {}
    tick = time.perf_counter()

    def phase(label):
        nonlocal tick
        now = time.perf_counter()
        phases[label] = round(now - tick, 3)
        phase_rss[label] = rss_bytes()
        tick = now

    from torch_ref.official import read_checkpoint

    state_dict, info = read_checkpoint(src)
    phase("read")
    flavour = keymap.detect_flavour(list(state_dict))
    if flavour is not None:
        view = OrderedDict()
        for k, v in state_dict.items():
            tk, _ = flavour.map_key(k)
            if tk is not None:
                view[tk] = v
    else:
        view = state_dict
    cfg_used, cfg_inferred, cfg_overrides, cfg_note = _resolve_cfg(name, keymap, view, cfg, partial)
    del view

    try:
        with torch.device("meta"):
            torch_model = torch_ref.build_model(name, **cfg_used)
        # The twin's keys/shapes/dtypes, cached per (model, cfg): building a Paddle twin is the slow part (random
        # init), and a conversion that fails its plan never needs the weights. A twin built here is kept for the
        # strict reload; otherwise one is built then, after the source is released.
        twin, target_shapes, target_dtypes = _twin_signature(paddle_impl, name, cfg_used)
    except (TypeError, ValueError) as e:
        raise ConversionError(f"{name}: cannot build the model with cfg {cfg_used}: {e}") from None
    phase("build")
    for p in prefixes:
        if not any(k.startswith(p) for k in target_shapes):
            tops = sorted({k.split(".")[0] for k in target_shapes})
            raise ConversionError(f"--partial {p!r} matches no key of the {name} twin (top-level modules: "
                                  f"{', '.join(tops)}; aliases: {', '.join(keymap.partial_aliases) or 'none'})")

    rows = plan_conversion(torch_model, [(k, tuple(v.shape)) for k, v in state_dict.items()], keymap,
                           target_shapes=target_shapes, partial=prefixes, flavour=flavour,
                           dtypes={k: _torch_dtype_name(v.dtype) for k, v in state_dict.items()},
                           target_dtypes=target_dtypes)
    del torch_model
    phase("plan")
    rep = ConversionReport(model=name, src=str(src), dst=str(dst), cfg=cfg_used, cfg_inferred=cfg_inferred,
                           cfg_overrides=cfg_overrides, cfg_note=cfg_note, partial=list(partial),
                           partial_prefixes=list(prefixes), flavour=flavour.name if flavour else None, info=info,
                           rows=rows)
    bad = [r for r in rows if r.action in ERROR_ACTIONS]
    if bad:
        msg = f"{name}: {src} does not match the Paddle twin (cfg {cfg_used}): {_group(bad)}"
        if cfg_note:
            msg += f"; {cfg_note}"
        if flavour is not None and not partial:
            msg += (f"; this looks like a {flavour.name} checkpoint ({flavour.description}): convert it with "
                    f"--partial {next(iter(keymap.partial_aliases), 'PREFIX')}")
        elif any(r.action == "missing" for r in bad) and not partial and keymap.partial_aliases:
            msg += "; if the checkpoint is only meant to cover part of the model, name that part with --partial"
        rep.error = msg
        rep.seconds = round(time.perf_counter() - t0, 3)
        if report is not None:
            rep.to_json(report)
        raise ConversionError(msg, rep)

    writes = [r for r in rows if r.action in ("copy", "rename", "transpose", "fill")]
    bar = _progress(progress, len(writes), f"convert {name}")
    releaser = SourcePageReleaser(src, state_dict)
    source_of = {r.target: r.source for r in writes}

    def maker(row: KeyAction):
        def make():
            if row.action == "fill":  # a value the official loader sets for a key such files never hold
                import numpy as np
                return np.full(row.target_shape, flavour.fill(row.target)[0],
                               dtype=target_dtypes.get(row.target) or "float32")
            tensor = state_dict.pop(row.source)  # dropped as soon as its array is serialised
            return materialize(row, tensor, target_dtypes.get(row.target))
        return make

    def written(target: str) -> None:
        if source_of[target] is not None:
            releaser.release(source_of[target])  # give back the source's pages (memory-mapped checkpoints)
        if bar is not None:
            bar.update(1)

    try:
        with atomic_path(dst) as tmp:  # dst appears (renamed from tmp) only after the strict reload below passed
            with open(tmp, "wb") as f:
                write_pdparams(f, [(r.target, maker(r)) for r in writes], on_item=written)
                f.flush()
                os.fsync(f.fileno())
            if bar is not None:
                bar.close()
            state_dict.clear()  # drops the source's tensors, and with them the memory map (make() keeps the name)
            phase("write")

            # strict reload of what was written, into the twin
            from paddle_impl.checkpoint import strict_load

            if twin is None:
                twin = paddle_impl.build_model(name, **cfg_used)
            loaded = paddle.load(tmp, return_numpy=True)
            if not isinstance(loaded, dict):
                raise ConversionError(f"{tmp}: paddle.load returned a {type(loaded).__name__}, not a state dict")
            covered = [r.target for r in writes]
            with warnings.catch_warnings():  # partial: Paddle warns "Skip loading for <keep-init key>" for each
                warnings.filterwarnings("ignore", message="Skip loading for ")
                strict_load(_CoveredKeys(twin, covered) if prefixes else twin, loaded, source=str(dst))
            del loaded, twin
        phase("reload")
    except BaseException:
        if bar is not None:
            bar.close()
        raise

    rep.ok = True
    rep.seconds = round(time.perf_counter() - t0, 3)
    rep.phases = phases
    rep.memory = meter.result(int(info["size_bytes"]))
    rep.memory["rss_after_phase_bytes"] = phase_rss
    rep.memory["source_pages_released_bytes"] = releaser.released_bytes
    if report is not None:
        rep.to_json(report)
    return rep
