"""Official checkpoint formats, read and written: the one module that knows them (torch_ref loads with it, the
converter reads with it, the alignment and the tests write random weights with it).

    state_dict, info = read_checkpoint("train_epoch_200.pth")        # any official file, never running its code
    save_official("pspnet", model, "train_epoch_7.pth")              # the object the upstream script saves

Reading:

* torch files (zip format, or the legacy pickle format) are read with
  `torch.load(map_location="cpu", weights_only=True, mmap=True)`: tensors stay memory-mapped until used, and a pickle
  that references any global the weights-only unpickler does not allow is REFUSED before anything in it runs. The
  only globals allowed beyond torch's own are numpy's numeric scalar and dtype constructors (NVIDIA's checkpoints
  store `mean_iu` as a numpy float64).
* detectron2 `.pkl` files (a pickled `{'model': {name: numpy array}, ...}`) are read by a restricted unpickler that
  resolves only numpy's array-reconstruction globals and `collections.OrderedDict`; any other global is refused by
  name, without being imported.
* Containers are unwrapped (`state_dict`, then `model`) and a leading `module.` (DataParallel/DDP) is stripped from
  every key -- the only normalisations. Anything else odd is a `CheckpointError` with a one-line message that names
  the file (and the key, when one is at fault).

The file's format is recognised from its first bytes, not its extension (a `.pkl` holding a torch zip is read as a
torch file; a `.pth` holding a plain pickle goes through the restricted unpickler).
"""
from __future__ import annotations

import hashlib
import io
import os
import pickle
import re
import stat
import tarfile
from collections import OrderedDict
from pathlib import Path
from typing import Any, Mapping

__all__ = ["CheckpointError", "read_checkpoint", "sha256_file", "sniff_format", "FORMATS", "official_state",
           "save_official"]

# The magic number torch's legacy (pre-1.6, non-zip) serialisation pickles first, after protocol 2's header.
_TORCH_LEGACY_MAGIC = b"\x80\x02\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little")
_ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")
_CONTAINER_KEYS = ("state_dict", "model", "blobs")  # blobs: Caffe2 / Detectron1 model-zoo .pkl
_PREFIX = "module."


class CheckpointError(Exception):
    """A checkpoint that cannot be read (missing, not a checkpoint, truncated, refused, odd layout).

    The message is one line and always names the file; `path` holds it too.
    """

    def __init__(self, path, message: str):
        self.path = str(path)
        message = " ".join(str(message).split())  # one line, whatever the cause said
        if self.path not in message:
            message = f"{self.path}: {message}"
        super().__init__(message)


# --------------------------------------------------------------------------------------------------------------------
# helpers


def sha256_file(path, chunk: int = 1 << 20) -> str:
    """SHA-256 of a file, read in 1 MiB chunks (through the page cache, not into the process)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def _check_path(p: Path) -> os.stat_result:
    try:
        st = p.stat()
    except FileNotFoundError:
        raise CheckpointError(p, f"{p}: no such file") from None
    except OSError as e:
        raise CheckpointError(p, f"{p}: cannot stat the file ({e.strerror or e})") from None
    if stat.S_ISDIR(st.st_mode):
        raise CheckpointError(p, f"{p} is a directory, not a checkpoint file")
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointError(p, f"{p} is not a regular file")
    if st.st_size == 0:
        raise CheckpointError(p, f"{p} is empty (0 bytes), not a checkpoint")
    if not os.access(p, os.R_OK):
        raise CheckpointError(p, f"{p} is not readable (permission denied)")
    return st


def sniff_format(path) -> str:
    """'torch-zip', 'torch-legacy', 'torch-tar', 'pickle' or 'unknown', from the file's first bytes."""
    with open(path, "rb") as f:
        head = f.read(64)
    if head.startswith(_ZIP_MAGICS):
        return "torch-zip"
    if head.startswith(_TORCH_LEGACY_MAGIC):
        return "torch-legacy"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "pickle"
    try:
        if tarfile.is_tarfile(path):
            return "torch-tar"
    except OSError:
        pass
    return "unknown"


def _describe_head(path) -> str:
    with open(path, "rb") as f:
        head = f.read(16)
    printable = sum(32 <= b < 127 or b in (9, 10, 13) for b in head)
    kind = "text" if printable == len(head) else "binary data"
    return f"{kind} starting with {head!r}"


def _first_line(text: str, limit: int = 200) -> str:
    """First sentence of the first line of an error text, ANSI colours removed, at most `limit` characters."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(text)).strip()
    line = text.splitlines()[0] if text else ""
    m = re.match(r"(.+?[.!?])\s", line + " ")
    if m:
        line = m.group(1)
    return line[:limit] + ("..." if len(line) > limit else "")


def _refused(p: Path, what: str) -> CheckpointError:
    return CheckpointError(p, f"refused: {p} contains pickled code/objects that weights_only loading does not allow "
                              f"({what}) — segtwin never executes checkpoint code")


# --------------------------------------------------------------------------------------------------------------------
# torch files


def _weights_only_detail(message: str) -> str:
    """The offending global (or the unpickler's own complaint) out of torch's weights_only error text."""
    m = re.search(r"GLOBAL ([A-Za-z_][\w.]*)", message)
    if m:
        return m.group(1).rstrip(".")
    m = re.search(r"but got <class '([\w.]+)'>", message)
    if m:
        return m.group(1)
    m = re.search(r"WeightsUnpickler error: (.*)", message)
    if m:
        return _first_line(m.group(1))
    return "content the weights-only unpickler rejects"


def _numpy_scalar_globals() -> list:
    """The globals a pickled numpy scalar needs, and nothing else: NVIDIA/semantic-segmentation saves `mean_iu` and
    runx's `__metric` as numpy float64 scalars (`np.nanmean`), pickled as `<numpy>.multiarray.scalar(dtype, bytes)`
    with a `numpy.dtype`. The scalar constructor is allowed under both the numpy 1.x module name (files written
    before numpy 2) and the 2.x one; it only rebuilds a number from its raw bytes."""
    import numpy as np

    try:
        from numpy._core.multiarray import scalar  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import scalar
    dtype_classes = [type(np.dtype(code)) for code in NUMERIC_DTYPE_CODES]  # numpy.dtypes.Float64DType, ...
    return [np.dtype, *dtype_classes, (scalar, "numpy.core.multiarray.scalar"),
            (scalar, "numpy._core.multiarray.scalar")]


#: numpy's numeric scalar types (bool, signed/unsigned integers, floats, complex): their dtype classes are what numpy
#: >= 1.25 pickles as the state of a scalar's dtype. Object, string and void dtypes are NOT allowed.
NUMERIC_DTYPE_CODES = "?bBhHiIlLqQefdgFDG"


def _torch_load(p: Path, fmt: str) -> Any:
    import torch

    def load(mmap: bool):
        with torch.serialization.safe_globals(_numpy_scalar_globals()):
            return torch.load(p, map_location="cpu", weights_only=True, mmap=mmap)

    try:
        try:
            return load(mmap=(fmt == "torch-zip"))
        except RuntimeError as e:
            if "mmap can only be used" not in str(e):
                raise
            return load(mmap=False)  # legacy non-zip file: no mmap possible
    except pickle.UnpicklingError as e:
        msg = str(e)
        if "Weights only load failed" in msg or "WeightsUnpickler" in msg:
            raise _refused(p, _weights_only_detail(msg)) from None
        raise CheckpointError(p, f"{p} is truncated or corrupt ({fmt}: {_first_line(msg)})") from None
    except (EOFError, RuntimeError, ValueError, KeyError, OSError, TypeError, AttributeError, IndexError,
            tarfile.TarError, UnicodeDecodeError, OverflowError, MemoryError) as e:
        detail = _first_line(str(e)) or type(e).__name__
        if "central directory" in detail or isinstance(e, EOFError):
            what = "truncated or corrupt"
        else:
            what = "not a readable torch checkpoint (truncated or corrupt?)"
        raise CheckpointError(p, f"{p} is {what} ({fmt}: {type(e).__name__}: {detail})") from None


# --------------------------------------------------------------------------------------------------------------------
# detectron2 .pkl (plain pickles of numpy arrays)


def _pickle_load(p: Path) -> Any:
    from alignment import safe_pickle

    try:
        with open(p, "rb") as f:
            return safe_pickle.load(io.BufferedReader(f, 1 << 20), encoding="latin1")
    except safe_pickle.Refused as e:
        raise _refused(p, e.global_name) from None
    except safe_pickle.CORRUPT as e:
        detail = _first_line(str(e)) or type(e).__name__
        raise CheckpointError(p, f"{p} is not a readable pickle (truncated or corrupt: {type(e).__name__}: "
                                 f"{detail})") from None


# --------------------------------------------------------------------------------------------------------------------
# layout normalisation


def _unwrap(p: Path, obj: Any) -> tuple[Mapping, str | None, list]:
    if not isinstance(obj, Mapping):
        raise CheckpointError(p, f"{p} holds a {type(obj).__name__}, not a state dict (a dict of tensors, or a dict "
                                 f"with one under 'state_dict' or 'model')")
    for key in _CONTAINER_KEYS:
        inner = obj.get(key)
        if isinstance(inner, Mapping):
            return inner, key, [str(k) for k in obj if k != key]
    return obj, None, []


def _strip_module(p: Path, keys: list) -> tuple[list, str | None]:
    with_prefix = [k for k in keys if k.startswith(_PREFIX)]
    if not with_prefix:
        return keys, None
    if len(with_prefix) != len(keys):
        without = [k for k in keys if not k.startswith(_PREFIX)]
        raise CheckpointError(p, f"{p}: only some keys start with '{_PREFIX}' ({len(with_prefix)} of {len(keys)}, "
                                 f"e.g. {', '.join(with_prefix[:3])}; without it: {', '.join(without[:3])}); segtwin "
                                 f"strips the prefix only when every key has it")
    return [k[len(_PREFIX):] for k in keys], _PREFIX


def _to_tensor(p: Path, key: str, value: Any):
    import numpy as np
    import torch

    if isinstance(value, torch.Tensor):
        if value.layout != torch.strided or value.is_quantized:
            raise CheckpointError(p, f"{p}: state_dict value {key!r} is a {value.layout} / quantized tensor; only "
                                     f"dense tensors are supported")
        return value.detach() if value.requires_grad else value
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in "biuf":
            raise CheckpointError(p, f"{p}: state_dict value {key!r} is a numpy array of dtype {value.dtype}, not "
                                     f"numbers")
        if not value.dtype.isnative:
            value = value.astype(value.dtype.newbyteorder("="))
        if not value.flags.writeable or not value.flags.c_contiguous:
            value = np.array(value, copy=True, order="C")
        return torch.from_numpy(value)
    raise CheckpointError(p, f"{p}: state_dict value {key!r} is a {type(value).__name__}, not a tensor")


def read_checkpoint(path) -> tuple["OrderedDict[str, Any]", dict]:
    """Read an official checkpoint into an OrderedDict name -> torch.Tensor (CPU; memory-mapped when possible).

    Returns (state_dict, info); info = {path, format, size_bytes, sha256, unwrapped, stripped_prefix,
    ignored_top_level_keys, num_keys}. Raises CheckpointError (one line, naming the file) for anything unreadable,
    and refuses pickles that reference globals beyond plain tensors / numpy arrays.
    """
    p = Path(path)
    st = _check_path(p)
    fmt = sniff_format(p)
    if fmt == "unknown" and not p.name.endswith(".pkl"):
        raise CheckpointError(p, f"{p} is not a checkpoint (neither a torch zip/legacy file nor a pickle: "
                                 f"{_describe_head(p)})")
    if fmt.startswith("torch"):
        obj = _torch_load(p, fmt)
    else:
        obj = _pickle_load(p)
        fmt = "detectron2-pkl" if p.name.endswith(".pkl") else "pickle"

    inner, unwrapped, ignored = _unwrap(p, obj)
    del obj
    keys = list(inner.keys())
    bad = [k for k in keys if not isinstance(k, str)]
    if bad:
        raise CheckpointError(p, f"{p}: state_dict key {bad[0]!r} is a {type(bad[0]).__name__}, not a string")
    if not keys:
        raise CheckpointError(p, f"{p} holds an empty state dict" + (f" under {unwrapped!r}" if unwrapped else ""))
    names, stripped = _strip_module(p, keys)
    state_dict: OrderedDict = OrderedDict()
    for key, name in zip(keys, names):
        if name in state_dict:
            raise CheckpointError(p, f"{p}: key {name!r} appears twice after stripping {stripped!r}")
        state_dict[name] = _to_tensor(p, key, inner[key])
    info = {
        "path": str(p),
        "format": fmt,
        "size_bytes": int(st.st_size),
        "sha256": sha256_file(p),
        "unwrapped": unwrapped,
        "stripped_prefix": stripped,
        "ignored_top_level_keys": ignored,
        "num_keys": len(state_dict),
    }
    return state_dict, info


# --------------------------------------------------------------------------------------------------------------------
# writing: the object each upstream training script saves (a model spec's `official_format` names one of these)


def _semseg_state(model) -> dict:
    """hszhao/semseg: {'epoch', 'state_dict' with 'module.' keys, 'optimizer'}, saved from a DDP-wrapped model."""
    sd = {"module." + k: v.detach().clone() for k, v in model.state_dict().items()}
    return {"epoch": 0, "state_dict": sd, "optimizer": {"state": {}, "param_groups": []}}


def _encoding_state(model) -> dict:
    """junfu1115/DANet (PyTorch-Encoding): {'epoch', 'state_dict' WITHOUT a prefix (it saves
    `model.module.state_dict()`), 'optimizer', 'best_pred'}."""
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return {"epoch": 0, "state_dict": sd, "optimizer": {"state": {}, "param_groups": []}, "best_pred": 0.0}


def _plain_state(model) -> dict:
    """A bare state dict (`torch.save(model.state_dict())`), e.g. a user's own model."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _detectron2_state(model) -> dict:
    """detectron2's DetectionCheckpointer `.pth` (`model_final.pth` of a training run): {'model': state dict (torch
    tensors), 'iteration'} (a real one also holds 'optimizer' and 'scheduler', which a conversion ignores)."""
    return {"model": {k: v.detach().clone() for k, v in model.state_dict().items()}, "iteration": 0}


def _detectron2_zoo_state(model) -> dict:
    """detectron2's model-zoo `.pkl` (`model_final_cf6ac1.pkl`): a plain pickle of {'model': {name: numpy array},
    '__author__': ...} -- no torch objects at all (written with `pickle`, see `PICKLE_FORMATS`)."""
    return {"model": {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()},
            "__author__": "Detectron2 Model Zoo"}


def _nvidia_state(model) -> dict:
    """NVIDIA/semantic-segmentation (`utils/misc.py` eval_metrics + runx `logx.save_model`): {'epoch', 'arch',
    'num_classes', 'state_dict' with 'module.' keys (apex DDP), 'optimizer', 'mean_iu', 'command', '__metric'},
    where mean_iu and __metric are numpy float64 scalars (np.nanmean of the IoUs)."""
    import numpy as np

    sd = {"module." + k: v.detach().clone() for k, v in model.state_dict().items()}
    arch = "network.ocrnet.HRNet_Mscale" if getattr(model, "mscale", True) else "network.ocrnet.HRNet"
    return {"epoch": 0, "arch": arch, "num_classes": int(getattr(model, "num_classes", 19)), "state_dict": sd,
            "optimizer": {"state": {}, "param_groups": []}, "mean_iu": np.float64(0.0),
            "command": "train.py --dataset cityscapes --arch " + arch, "__metric": np.float64(0.0)}


#: official_format name -> function(model) -> the object the upstream script saves
FORMATS = {"semseg": _semseg_state, "encoding": _encoding_state, "plain": _plain_state,
           "detectron2": _detectron2_state, "detectron2-zoo": _detectron2_zoo_state, "nvidia": _nvidia_state}
#: formats saved with `pickle.dump` (numpy arrays only) rather than `torch.save`
PICKLE_FORMATS = ("detectron2-zoo",)


def _official_format(name: str) -> str:
    from alignment.specs import get_spec
    return get_spec(name).official_format


def official_state(name: str, model, fmt: str | None = None) -> dict:
    """The object model `name`'s upstream training script saves (its spec's `official_format`, or `fmt`)."""
    fmt = fmt or _official_format(name)
    if fmt not in FORMATS:
        raise KeyError(f"{name}: no writer for the official checkpoint format {fmt!r}; known: {', '.join(FORMATS)}")
    return FORMATS[fmt](model)


def save_official(name: str, model, path, fmt: str | None = None) -> Path:
    """Write `model`'s weights as model `name`'s official checkpoint file (atomically); returns the path. `fmt`: one
    of `FORMATS` instead of the spec's `official_format` (e.g. PointRend's `.pth` next to its model-zoo `.pkl`)."""
    import pickle

    import torch

    from alignment.utils import atomic_path

    path = Path(path)
    obj = official_state(name, model, fmt)
    with atomic_path(path) as tmp:
        if (fmt or _official_format(name)) in PICKLE_FORMATS:
            with open(tmp, "wb") as f:
                pickle.dump(obj, f, protocol=4)
        else:
            torch.save(obj, tmp)
    return path
