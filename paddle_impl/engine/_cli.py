"""Shared pieces of the eval / predict / export / infer command lines (config, weights, test-time options)."""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Dict, Optional, Tuple

from .evaluator import PROTOCOLS


def add_test_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("test-time options (default: the config's test_config section, else semseg tool/test.py "
                             "semantics, whole image, no flip, scale 1; a flag given here overrides the config)")
    g.add_argument("--protocol", choices=PROTOCOLS, default=None,
                   help="semseg: softmax averaged over flips/windows/scales (default); danet: junfu1115/DANet "
                        "MultiEvalModule (exp of the flip-summed logits, summed over scales, windows of --slide CROP "
                        "only where the scaled long side exceeds CROP)")
    g.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None,
                   help="add the horizontally flipped image (--no-flip: do not)")
    g.add_argument("--scales", type=float, nargs="+", default=None, metavar="S",
                   help="image scales whose scores are combined (default: 1.0)")
    g.add_argument("--base-size", type=int, default=None, metavar="N",
                   help="scale s resizes the long side to round(s*N) as semseg (danet: ceil(s*N)); default: s times "
                        "the image size")
    g.add_argument("--slide", type=int, nargs=2, default=None, metavar=("CROP", "STRIDE"),
                   help="sliding-window inference with square windows CROP every STRIDE pixels "
                        "(STRIDE 0: ceil(CROP*2/3), danet int(CROP*2/3)); default: whole image")
    g.add_argument("--whole", action="store_true", help="whole-image inference even if the config slides")
    g.add_argument("--ms", action="store_true",
                   help="multi-scale: lay the config's test_config.ms section over test_config")
    g.add_argument("--threads", type=int, default=None, help="CPU threads (default: $OMP_NUM_THREADS or Paddle's)")


def test_kwargs(args, cfg=None) -> dict:
    """Keyword arguments of ``evaluator.predict_logits``: the config's ``test_config`` (``Config.test_options``,
    with ``--ms`` its ``ms`` section), then every flag given on the command line on top."""
    kw = {"flip": False, "scales": (1.0,), "base_size": None, "mode": "whole"}
    if cfg is not None:
        kw.update(cfg.test_options(ms=bool(getattr(args, "ms", False))))
    elif getattr(args, "ms", False):
        raise ValueError("--ms needs a config with a test_config.ms section")
    if getattr(args, "protocol", None) is not None:
        kw["protocol"] = args.protocol
    if args.flip is not None:
        kw["flip"] = bool(args.flip)
    if args.scales is not None:
        kw["scales"] = tuple(args.scales)
    if args.base_size is not None:
        kw["base_size"] = args.base_size
    if args.slide and getattr(args, "whole", False):
        raise ValueError("--slide and --whole contradict each other; give one")
    if args.slide:
        crop, stride = args.slide
        kw.update(mode="slide", crop=crop, stride=stride if stride > 0 else None)
    elif getattr(args, "whole", False):
        kw["mode"] = "whole"
        kw.pop("crop", None)
        kw.pop("stride", None)
    return kw


def set_threads(n: Optional[int]) -> None:
    """--threads: Paddle's CPU thread count (and OMP_NUM_THREADS for what starts later); None keeps the defaults."""
    if n:
        from alignment.utils import set_threads as _set_threads

        os.environ["OMP_NUM_THREADS"] = str(n)
        _set_threads(n, ("paddle",))


def add_opts_argument(p: argparse.ArgumentParser) -> None:
    """``--opts KEY=VALUE ...``: any config key by dotted path (PaddleSeg's --opts, mmseg's --cfg-options)."""
    p.add_argument("--opts", nargs="+", default=[], metavar="KEY=VALUE",
                   help="override config keys by dotted path, e.g. --opts lr_scheduler.learning_rate=0.005 "
                        "train_dataset.transforms.5.size=[769,769] optimizer.momentum=null (null removes a key); "
                        "values are YAML; checked against the schema like the file")


def load_cfg(path: str, data_root: Optional[str] = None, opts=None):
    """The config with ``--opts`` applied, then ``--data-root`` (val_dataset.dataset_root)."""
    from ..config import load_config, parse_opts  # lazily: the config module is optional for the library functions
    overrides = parse_opts(opts)
    if data_root:
        overrides["val_dataset.dataset_root"] = data_root
    return load_config(path, overrides)


def load_weights(model, weights: str) -> None:
    """A ``.pdparams`` (plain state dict, or a dict with a ``model`` state dict) or a checkpoint directory holding
    ``model.pdparams``; loaded strictly."""
    from ..checkpoint import read_state_file, strict_load

    path = weights
    if os.path.isdir(path):
        path = os.path.join(path, "model.pdparams")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights {weights} not found (a .pdparams file or a checkpoint directory with "
                                f"model.pdparams)")
    sd = read_state_file(path)
    if isinstance(sd, dict) and isinstance(sd.get("model"), dict):
        sd = sd["model"]
    strict_load(model, sd, source=path)


def inference_options(cfg) -> Dict[str, Tuple[Any, str]]:
    """{key: (value, where it comes from)} of the model options the inference commands choose for themselves: the
    keys of the model spec's ``inference_cfg`` (PSANet ``psa_impl: fused``, DANet ``pam_impl: efficient``). The rule:
    a key present in the config's ``model`` section after ``--opts`` (the YAML file, or ``--opts model.KEY=VALUE``)
    is the user's choice and is kept; an absent key (never written, or removed with ``--opts model.KEY=null``)
    takes the spec's inference value, unless the spec's ``inference_unless`` says it does not apply to this model
    section: then the value is None (the model's own default is built). ``segtwin train`` does not call this: it
    builds the recipe as written."""
    model = cfg.raw["model"]
    out: Dict[str, Tuple[Any, str]] = {}
    for key, value in cfg.spec.inference_cfg.items():
        when, reason = cfg.spec.inference_unless.get(key, (None, ""))
        if key not in model and when and all(model.get(k) == v for k, v in when.items()):
            out[key] = (None, f"no inference default: {reason}")
        elif key not in model:
            out[key] = (value, f"inference default; the config does not set model.{key}")
        elif f"model.{key}" in cfg.overrides:
            out[key] = (model[key], f"--opts model.{key}")
        else:
            out[key] = (model[key], f"model.{key} in {cfg.file}")
    return out


def chosen_values(chosen: Dict[str, Tuple[Any, str]]) -> Dict[str, Any]:
    """The options ``inference_options`` sets ({key: value}), without the keys it leaves to the model."""
    return {k: v for k, (v, _) in chosen.items() if v is not None}


def build_model(cfg, weights: Optional[str]):
    """The config's model for inference (``segtwin eval``, ``predict``, ``export``): ``inference_options`` on top of
    the config, then ``weights``, in eval mode. Prints one line (stderr) naming the attention path it took."""
    chosen = inference_options(cfg)
    model = cfg.build_model(defaults=chosen_values(chosen))
    if chosen:
        print(f"segtwin: {cfg.model_type} inference uses "
              + "; ".join(f"{k}={v} ({why})" if v is not None else f"{k} as the model builds it ({why})"
                          for k, (v, why) in chosen.items()), file=sys.stderr)
    if weights:
        load_weights(model, weights)
    model.eval()
    return model


def normalize_from_config(cfg, section: str = "val_dataset") -> Tuple[tuple, tuple, bool]:
    """(mean, std, reverse_channels) on the 0..255 pixel scale equivalent to the config's ``Normalize`` transform
    (val, else train) -- its ``preset``, ``scale`` and ``to_rgb``/``to_bgr`` honoured: ``(x * scale - m) / s`` is
    ``(x - m / scale) / (s / scale)`` -- else semseg's defaults. Bad arguments raise as the transform does."""
    from ..transforms import SEMSEG_MEAN, SEMSEG_STD, Normalize

    for sec in (section, "train_dataset"):
        for t in (cfg.raw.get(sec) or {}).get("transforms", []) or []:
            if isinstance(t, dict) and t.get("type") == "Normalize":
                n = Normalize(**{k: v for k, v in t.items() if k != "type"})
                return (tuple(m / n.scale for m in n.mean), tuple(s / n.scale for s in n.std),
                        bool(n.to_bgr or n.to_rgb))
    return SEMSEG_MEAN, SEMSEG_STD, False


def dataset_type(cfg) -> str:
    for sec in ("val_dataset", "train_dataset"):
        if sec in cfg.raw:
            return cfg.raw[sec].get("type", "")
    return ""


def palette_name(dtype: str) -> str:
    return "cityscapes" if dtype == "Cityscapes" else "voc"


def fail(prog: str, e: BaseException) -> int:
    print(f"{prog}: error: {e}", file=sys.stderr)
    return 2
