"""`alignment.run(name, ...)`: the whole alignment of one model, returning the verdict dict (also verdict.json)."""
from __future__ import annotations

import gc
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from .context import Context, StepResult, determinism_flags, seed_everything
from .logutil import get_logger, root_logger_guard
from .policy import Policy
from .utils import parse_size, set_threads

DEFAULT_NUM_CLASSES = 19
CALIBRATION_BATCH = 16
CALIBRATION_MAX_SIDE = 129  # satisfies semseg's (H-1) % 8 == 0
log = get_logger("segtwin.align")


class AlignmentSetupError(ValueError):
    """Bad arguments or inputs (exit code 2), as opposed to a failed alignment (exit code 1)."""


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, text=True,
                              capture_output=True, timeout=10).stdout.strip() or "unknown"
    except Exception:
        return "unknown"


def parse_model_cfg(items) -> dict:
    """['psa_type=0', 'compact=true', 'mask_size=7,11'] -> {'psa_type': 0, 'compact': True, 'mask_size': [7, 11]}."""
    from .specs import parse_cfg_items

    try:
        return parse_cfg_items(items)
    except ValueError as e:
        raise AlignmentSetupError(str(e)) from None


#: The steps that run the twins in training mode (BatchNorm on batch statistics): they need N >= 2.
TRAIN_STEPS = ("loss", "backward")


def parse_input_size(text, steps: Optional[Sequence[str]] = None) -> tuple:
    """N,C,H,W of `--input-size`. N = 1 is accepted only when `steps` (default: all) run no training step: the
    forward and metric steps run eval mode, the schedule step no forward at all."""
    try:
        vals = parse_size(text, "--input-size", "NCHW")
    except ValueError as e:
        raise AlignmentSetupError(str(e)) from None
    if vals[1] != 3:
        raise AlignmentSetupError(f"--input-size: the models take 3-channel RGB input, got C={vals[1]}")
    training = [s for s in (TRAIN_STEPS if steps is None else steps) if s in TRAIN_STEPS]
    if vals[0] < 2 and training:
        raise AlignmentSetupError(f"--input-size: N must be >= 2 for the {' and '.join(training)} step(s) (they run "
                                  "BatchNorm in training mode, which needs more than one value per channel; "
                                  "PSPNet's 1x1 pyramid branch has exactly N; --steps forward,schedule,metric take "
                                  f"N=1), got N={vals[0]}")
    return vals


def _check_size(model, size) -> None:
    """The official code's input-size rule, checked before any work (exit code 2, not a failed step)."""
    check = getattr(type(model), "check_input", None)
    if check is not None:
        try:
            check(size[2], size[3])
        except ValueError as e:
            raise AlignmentSetupError(f"--input-size {','.join(map(str, size))}: {e}") from None


def _calibrate_bn(model, x, seed: int = 0) -> None:
    """Give random weights realistic BN running statistics: one train-mode pass with cumulative averaging.

    Frozen BN layers (detectron2's FrozenBatchNorm2d: fixed buffers, identity at initialisation) get their
    affine terms drawn (weight U(0.5, 1.5), bias U(-0.2, 0.2): with 1 and 0 a swapped weight/bias would not show)
    and their running statistics set, in the same pass, to the per-channel mean and biased variance of their own
    input, as a trained trunk would hold; without it 100 layers of random convolutions reach 1e5 and beyond."""
    import torch

    from torch_ref.layers import FrozenBatchNorm2d

    saved, hooks = {}, []
    gen = torch.Generator().manual_seed(seed + 3)

    def set_frozen_stats(m, inputs):
        v = inputs[0].detach()
        m.running_mean.copy_(v.mean((0, 2, 3)))
        m.running_var.copy_(v.var((0, 2, 3), unbiased=False))

    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            saved[m] = m.momentum
            m.momentum = None
            m.reset_running_stats()
        elif isinstance(m, FrozenBatchNorm2d):
            c = m.num_features
            m.weight.copy_(0.5 + torch.rand(c, generator=gen, dtype=torch.float64).to(m.weight.dtype))
            m.bias.copy_(0.4 * torch.rand(c, generator=gen, dtype=torch.float64).to(m.bias.dtype) - 0.2)
            hooks.append(m.register_forward_pre_hook(set_frozen_stats))
    model.train()
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    for m, mom in saved.items():
        m.momentum = mom
        m.num_batches_tracked.zero_()
    model.eval()


def _calibration_side(model, side: int) -> int:
    """The largest side <= min(side, CALIBRATION_MAX_SIDE) that the model's input rule accepts (square)."""
    check = getattr(type(model), "check_input", None)
    for s in range(min(side, CALIBRATION_MAX_SIDE), 0, -1):
        try:
            if check is not None:
                check(s, s)
            return s
        except ValueError:
            continue
    return side


def _wake_zero_init(model, names, seed: int) -> list:
    """Give the model's zero-initialised branch scales (spec `zero_init_params`, e.g. DANet's attention gammas)
    values drawn from U(0.5, 1.5): at zero they switch their whole branch off, so neither the forward outputs nor a
    bug in the branch would show in the comparison (a trained checkpoint has them non-zero). Returns the names set."""
    import torch

    names = list(names)
    params = dict(model.named_parameters())
    gen = torch.Generator().manual_seed(seed + 2)
    with torch.no_grad():
        for n in names:
            params[n].copy_(0.5 + torch.rand(params[n].shape, generator=gen, dtype=torch.float64).to(params[n].dtype))
    return names


def _synthetic_batch(size, num_classes, seed):
    rng = np.random.default_rng(seed)
    n, c, h, w = size
    images = rng.standard_normal((n, c, h, w)).astype(np.float32)
    labels = rng.integers(0, num_classes, size=(n, h, w)).astype(np.int64)
    labels[rng.random((n, h, w)) < 0.05] = 255
    return images, labels, f"synthetic N(0,1) batch, seed {seed}, 5% ignore pixels"


def _data_batch(data: Path, size, name_hint: Optional[str] = None):
    from paddle_impl.datasets import DATASETS
    from paddle_impl.transforms import eval_batch

    data = Path(data)
    if not data.exists():
        raise AlignmentSetupError(f"--data {data}: no such directory")
    if (data / "leftImg8bit").is_dir():
        kind, split = "cityscapes", "val"
    elif (data / "VOCdevkit").is_dir() or (data / "JPEGImages").is_dir() or (data / "VOC2012").is_dir():
        kind, split = "voc", "val"
    else:
        raise AlignmentSetupError(f"--data {data}: neither a Cityscapes root (leftImg8bit/, gtFine/) nor a VOC root "
                                  "(VOCdevkit/VOC2012/ or JPEGImages/ + SegmentationClass/)")
    ds = DATASETS[kind](str(data), split=split)
    n, _, h, w = size
    if len(ds) < n:
        raise AlignmentSetupError(f"--data {data}: the {split} split has {len(ds)} images, the batch needs {n}")
    mean = [0.485 * 255, 0.456 * 255, 0.406 * 255]
    std = [0.229 * 255, 0.224 * 255, 0.225 * 255]
    images, labels = eval_batch(ds, n, (h, w), mean, std)
    return images.astype(np.float32), labels.astype(np.int64), f"{kind} {split} images from {data}", ds.num_classes


def official_config_path(name: str) -> Path:
    """The model's official recipe config (spec `recipe`): an absolute path as it is, else the file of that name
    shipped in paddle_impl/configs/."""
    import paddle_impl

    from .recipe import official_recipe
    from .specs import get_spec

    path = Path(official_recipe(get_spec(name)))
    if path.is_absolute():
        return path
    return Path(paddle_impl.__file__).resolve().parent / "configs" / path.name


def load_recipe(name: str, config=None, opts=None):
    """The `TrainRecipe` of `--config` (default: the model's official recipe config) with `--opts` applied;
    AlignmentSetupError (exit 2) naming the file and key for a bad config or one for another model."""
    from paddle_impl.config import ConfigError, load_config, parse_opts

    from .context import TrainRecipe
    from .recipe import RecipeError

    path = Path(config) if config is not None else official_config_path(name)
    try:
        cfg = load_config(path, parse_opts(opts))
    except (ConfigError, RecipeError, FileNotFoundError) as e:
        raise AlignmentSetupError(f"--config {path}: {e}") from None
    if cfg.model_type != name:
        raise AlignmentSetupError(f"--config {path}: it trains model.type {cfg.model_type!r}, not {name!r}")
    return TrainRecipe(cfg, name)


def config_model_cfg(recipe) -> dict:
    """The model keys of a config (`segtwin align --config`: the twins are built as `segtwin train` builds them)."""
    return {k: v for k, v in recipe.config.raw["model"].items()
            if k not in ("type", "pretrained", "backbone_pretrained", "num_classes")}


def _sync_loss_cfg(recipe, spec, model, user_config: bool) -> None:
    """The recipe's model section takes the loaded model's values of the keys its loss terms depend on (spec
    `loss_terms_by`: HRNet-OCR read as plain OCRNet from a checkpoint without `scale_attn.*` trains two outputs), so
    the loss both sides build -- through the trainer's own `Config.build_loss` -- is the loaded model's. When the
    recipe is the model's official one and its loss section was written for the other variant, the variant's
    official criterion (spec `official_loss`, the spec's weights) replaces it; a user's --config that does not fit
    is exit 2."""
    from .recipe import RecipeError

    changed = {}
    for key, _, _ in spec.loss_terms_by:
        if hasattr(model, key) and recipe.config.raw["model"].get(key) != getattr(model, key):
            recipe.config.raw["model"][key] = getattr(model, key)
            changed[key] = getattr(model, key)
    if not changed:
        return
    try:
        recipe.resolved = recipe.config.recipe
    except RecipeError as e:
        if user_config:
            raise AlignmentSetupError(f"--config {recipe.source}: the model is built with "
                                      f"{', '.join(f'{k}={v}' for k, v in changed.items())}, which its loss section "
                                      f"does not fit: {e}") from None
        # the official recipe's loss is written for the official model: this variant gets its official criterion
        recipe.config.raw.pop("loss", None)
        recipe.resolved = recipe.config.recipe


def _train_batch(recipe, data: Path, n: int):
    """The first batch `segtwin train` would read from `data` (the config's training pipeline, augmentation
    included, seeded as the trainer seeds it: same sampler, same per-sample transform seeds), with batch size `n`."""
    from paddle_impl.config import ConfigError
    from paddle_impl.engine.trainer import DataError, ResumableBatchSampler, SeededSamples, _read_batch

    cfg = recipe.config
    try:
        ds = cfg.build_dataset("train", root=data)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        raise AlignmentSetupError(f"--data {data}: {e}") from None
    if len(ds) < n:
        raise AlignmentSetupError(f"--data {data}: the training split has {len(ds)} samples, the batch needs {n}")
    seed = int(cfg.raw["seed"])
    keys = ResumableBatchSampler(len(ds), n, seed).batches(0)[0]
    try:
        images, labels = _read_batch(SeededSamples(ds, seed), keys)
    except DataError as e:
        raise AlignmentSetupError(f"--data {data}: {e}") from None
    except ValueError as e:  # np.stack of samples of different sizes: the pipeline has no fixed-size crop
        raise AlignmentSetupError(f"--data {data}: the training pipeline of {cfg.file} gives images of different "
                                  f"sizes ({e}); add a crop or override it with --opts") from None
    note = (f"{type(ds).__name__} training batch from {data} through the training pipeline of {cfg.file} "
            f"(seed {seed}, samples {[k % len(ds) for k in keys]})")
    return images.astype(np.float32), labels.astype(np.int64), note


def prepare(name: str, weights=None, out="segtwin_out", data=None, input_size=None, seed: int = 0,
            num_classes: Optional[int] = None, threads: Optional[int] = None, policy: Optional[Policy] = None,
            iters: int = 3, model_cfg: Optional[dict] = None, config=None, opts=None,
            side_cfg: Optional[dict] = None, steps: Optional[Sequence[str]] = None) -> tuple:
    """Build both twins from the same official-format weights and the shared batch. Returns (ctx, provenance).

    steps: the steps the run will take (default: all); only a run without training steps accepts N = 1.

    side_cfg: {"torch": {...}, "paddle": {...}}: model options for one side only, on top of the shared config (an
    implementation choice such as psa_impl / pam_impl: the torch reference path against the Paddle fused one, or the
    other way round). Only options that leave the checkpoint's keys unchanged make sense here; the weights and the
    conversion use the shared config.

    config: the training config whose recipe the loss/schedule/backward steps run (default: the model's official
    recipe config); given explicitly, its model keys and num_classes build the twins too (`model_cfg` wins)."""
    with root_logger_guard():
        import paddle  # noqa: F401  (import under the guard: it attaches root-logger handlers)
        import torch

    import paddle_impl
    import torch_ref
    import weights_convert
    from torch_ref.official import PICKLE_FORMATS, save_official, sha256_file

    from .specs import SPECS, ConfigInferenceError, model_names

    if name not in SPECS:
        raise AlignmentSetupError(f"unknown model {name!r}; registered: {', '.join(model_names())}")
    spec = SPECS[name]
    if iters < 1:
        raise AlignmentSetupError(f"--iters must be >= 1, got {iters}")
    recipe = load_recipe(name, config, opts)
    if config is not None:
        model_cfg = {**config_model_cfg(recipe), **(model_cfg or {})}
        num_classes = num_classes or recipe.config.raw["model"].get("num_classes")
    size = parse_input_size(input_size or spec.align_input, steps)
    if weights is None and config is None:
        model_cfg = {**spec.align_cfg, **(model_cfg or {})}
    else:
        model_cfg = dict(model_cfg or {})
    out_dir = Path(out) / name
    out_dir.mkdir(parents=True, exist_ok=True)
    n_threads = set_threads(threads)
    flags = determinism_flags()
    seed_everything(seed)
    policy = policy or Policy.load()

    if data is not None and config is not None:
        images, labels, inputs_note = _train_batch(recipe, Path(data), size[0])
        size = tuple(images.shape)
        data_classes = recipe.config.raw["model"].get("num_classes")
    elif data is not None:
        images, labels, inputs_note, data_classes = _data_batch(Path(data), size)
    else:
        images = labels = None
        data_classes = None

    wdir = out_dir / "weights"
    if weights is None:
        nc = num_classes or data_classes or DEFAULT_NUM_CLASSES
        try:
            model = torch_ref.build_model(name, num_classes=nc, **(model_cfg or {}))
        except (TypeError, ValueError) as e:
            raise AlignmentSetupError(f"{name}: cannot build the model with {model_cfg or {}}: {e}") from None
        _check_size(model, size)
        _wake_zero_init(model, spec.zero_init_params, seed)
        # BN statistics from a larger batch than the aligned one: with N=2 the 1x1 pyramid branch would get a
        # running variance from 2 values per channel, and eval-mode BN dividing by that near-zero std amplifies
        # rounding ~1e8-fold (measured in the float64 trace at 2x3x33x33), which no trained checkpoint does.
        # Large inputs are calibrated at a capped size (BN statistics are per channel; this keeps 16 images cheap).
        ch, cw = _calibration_side(model, size[2]), _calibration_side(model, size[3])
        calib, _, _ = _synthetic_batch((max(CALIBRATION_BATCH, size[0]), size[1], ch, cw), nc, seed + 1)
        _calibrate_bn(model, torch.from_numpy(calib), seed)
        ext = ".pkl" if spec.official_format in PICKLE_FORMATS else ".pth"
        src = save_official(name, model, wdir / f"{name}_random_official{ext}")
        del model
    else:
        src = Path(weights)
        if not src.is_file():
            raise AlignmentSetupError(f"--weights {src}: no such file")
    cfg = dict(model_cfg or {})
    if num_classes:
        cfg["num_classes"] = num_classes
    side_cfg = {side: dict((side_cfg or {}).get(side) or {}) for side in ("torch", "paddle")}
    try:
        torch_model = torch_ref.load_official(name, src, **{**cfg, **side_cfg["torch"]})
    except ConfigInferenceError as e:
        raise AlignmentSetupError(f"--weights {src}: {e}") from None
    except (TypeError, ValueError) as e:
        if isinstance(e, weights_convert.CheckpointError):
            raise
        extra = f" and --torch-cfg {side_cfg['torch']}" if side_cfg["torch"] else ""
        raise AlignmentSetupError(f"--weights {src}: cannot build the model with {cfg}{extra}: {e}") from None
    _check_size(torch_model, size)
    nc = torch_model.num_classes
    _sync_loss_cfg(recipe, spec, torch_model, user_config=config is not None)
    dst = wdir / f"{name}.pdparams"
    report = weights_convert.convert(name, src, dst, cfg=cfg or None, overwrite=True)
    report.to_json(wdir / "convert_report.json")
    try:
        paddle_model = paddle_impl.load_pdparams(name, dst, **{**cfg, **side_cfg["paddle"]})
    except (TypeError, ValueError) as e:
        if not side_cfg["paddle"]:
            raise
        raise AlignmentSetupError(f"--paddle-cfg {side_cfg['paddle']}: {e}") from None

    if images is None:
        images, labels, inputs_note = _synthetic_batch(size, nc, seed)
    elif labels[(labels != 255)].max(initial=0) >= nc:
        raise AlignmentSetupError(f"--data labels go up to {int(labels[labels != 255].max())} but the model has "
                                  f"{nc} classes")
    ctx = Context(name=name, torch_model=torch_model, paddle_model=paddle_model, images=images, labels=labels,
                  num_classes=nc, policy=policy, out_dir=out_dir, iters=iters, seed=seed,
                  ignore_index=recipe.config.ignore_index, recipe=recipe, inputs_note=inputs_note)
    ctx.snapshot()
    import paddle as _paddle
    provenance = {
        "model": name, "torch_module": type(torch_model).__module__,
        "paddle_module": type(paddle_model).__module__,
        "torch": torch.__version__, "paddle": _paddle.__version__, "numpy": np.__version__,
        "python": sys.version.split()[0], "platform": platform.platform(),
        "threads_requested": n_threads, "flags": flags, "seed": seed, "input_shape": list(images.shape),
        "inputs": inputs_note, "num_classes": nc, "iters": iters,
        "model_cfg": {k: _jsonable(v) for k, v in report.cfg.items()},
        "side_cfg": {side: {k: _jsonable(v) for k, v in c.items()} for side, c in side_cfg.items() if c},
        "weights": str(src), "weights_sha256": sha256_file(src), "random_weights": weights is None,
        "pdparams_sha256": sha256_file(dst), "git_commit": _git_commit(),
        "policy": policy.source if hasattr(policy, "source") else "alignment/tolerances.yaml",
        "recipe": {"config": str(recipe.source), "opts": list(opts or []),
                   "resolved": {k: _jsonable(v) for k, v in recipe.resolved.items()}},
        "command": " ".join(sys.argv),
    }
    return ctx, provenance


def _jsonable(v):
    """A config value as JSON keeps it: scalars and (nested) lists as they are, anything else as its repr."""
    if isinstance(v, (int, float, str, bool, type(None))):
        return v
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    return repr(v)


def _run_facts(ctx, results) -> dict:
    """What the run actually did, read off the models and the steps (not what it was asked to do)."""
    import paddle
    import torch

    tm, pm = ctx.torch_model, ctx.paddle_model
    t_dev = {str(p.device) for p in tm.parameters()}
    p_dev = {str(p.place) for p in pm.parameters()}
    facts = {
        "device": {"torch": sorted(t_dev), "paddle": sorted(p_dev), "paddle_get_device": paddle.get_device()},
        "threads": {"torch": torch.get_num_threads(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")},
        "dtypes": {step: res.dtype for step, res in results.items()},
        "lockstep": ctx.lockstep if "backward" in results else None,
        "free_run": (not ctx.lockstep) if "backward" in results else None,
    }
    return facts


def _first_divergent(step: str, res: StepResult, fwd, bwd) -> Optional[str]:
    from .context import module_path_of

    if res.passed:
        return None
    first_bad = next((r.key for r in res.results if not r.passed), None)
    if step == "forward":
        return (fwd.first_divergent if fwd else None) or (module_path_of(first_bad) if first_bad else None)
    if step == "loss":
        if first_bad and first_bad.startswith("output/"):
            return (fwd.first_divergent if fwd else None) or first_bad
        return module_path_of(first_bad) if first_bad else None
    if step == "backward":
        if first_bad and "/grad/" in first_bad and bwd and bwd.first_divergent:
            return bwd.first_divergent
        if first_bad and "/loss/" in first_bad and fwd and fwd.first_divergent:
            return fwd.first_divergent
        return module_path_of(first_bad) if first_bad else None
    return first_bad


def _drop_weights(wdir: Path, user_weights) -> None:
    """Remove the weight files the run wrote itself (never the user's --weights file); the report stays."""
    for f in list(wdir.glob("*.pth")) + list(wdir.glob("*.pkl")) + list(wdir.glob("*.pdparams")):
        if user_weights is not None and f.resolve() == Path(user_weights).resolve():
            continue
        f.unlink()


def _tree_bytes(root: Path) -> int:
    return sum(f.stat().st_size for f in Path(root).rglob("*") if f.is_file())


def human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024.0
    return f"{n} B"  # pragma: no cover


def run(name: str, weights=None, out="segtwin_out", data=None, input_size=None, iters: int = 3,
        steps: Sequence[str] = ("forward", "loss", "schedule", "backward", "metric"), seed: int = 0,
        num_classes: Optional[int] = None, threads: Optional[int] = None, policy: Optional[Policy] = None,
        trace: bool = True, full_artifacts: bool = False, progress: bool = True, lockstep: bool = True,
        model_cfg: Optional[dict] = None, keep_weights: bool = False, config=None, opts=None,
        side_cfg: Optional[dict] = None) -> dict:
    """Align the Paddle twin of `name` against its torch reference. Returns the verdict dict; `verdict['passed']`
    is True only when every requested step passed under the tolerance policy.

    side_cfg: {"torch": {...}, "paddle": {...}}, model options for one side only (see `prepare`).

    keep_weights: keep the official-format .pth (random weights) and the converted .pdparams in OUT/NAME/weights/
    (default: only their SHA-256 in the provenance and the converter's report are kept; a ResNet-101 pair is
    ~0.7 GB)."""
    from tqdm import tqdm

    from . import report as rep
    from .steps import ORDER, STEPS
    from .trace import run_trace

    unknown = [s for s in steps if s not in STEPS]
    if unknown or not steps:
        raise AlignmentSetupError(f"--steps: unknown step(s) {unknown}; choose from {', '.join(ORDER)}")
    steps = [s for s in ORDER if s in steps]
    t0 = time.time()
    ctx, provenance = prepare(name, weights=weights, out=out, data=data, input_size=input_size, seed=seed,
                              num_classes=num_classes, threads=threads, policy=policy, iters=iters,
                              model_cfg=model_cfg, config=config, opts=opts, side_cfg=side_cfg, steps=steps)
    ctx.full_artifacts = full_artifacts
    ctx.lockstep = lockstep
    results = {}
    bar = tqdm(steps, desc=f"align {name}", unit="step", disable=not progress, file=sys.stderr)
    for step in bar:
        bar.set_postfix_str(step)
        ts = time.time()
        try:
            res = STEPS[step](ctx)
        except Exception as e:  # a side that crashes is a failed step, reported with its error
            res = StepResult(step, error=f"{type(e).__name__}: {e}")
        res.seconds = time.time() - ts
        results[step] = res
    bar.close()
    provenance.update(_run_facts(ctx, results))
    fwd = bwd = None
    if trace:
        if len(ctx.images) < 2:
            log.info("%s: N=1: forward trace only (the backward trace runs BatchNorm in training mode)", name)
        try:
            fwd, bwd = run_trace(ctx, backward=len(ctx.images) >= 2)
        except Exception as e:
            log.warning("trace failed: %s: %s", type(e).__name__, e)
    for step, res in results.items():
        res.first_divergent = _first_divergent(step, res, fwd, bwd)
        rep.write_step(ctx.out_dir, res, full=full_artifacts)
    images = []
    if fwd is not None:
        rep.write_trace_csv(ctx.out_dir, fwd)
    if bwd is not None:
        rep.write_trace_csv(ctx.out_dir, bwd)
    try:
        images = rep.plot(ctx.out_dir, [t for t in (fwd, bwd) if t is not None],
                          results["backward"].series if "backward" in results else None)
    except Exception as e:  # plots are a convenience; never hide a verdict behind them
        log.warning("plots not written: %s", e)
    if "backward" in results and results["backward"].series.get("growth"):
        import json
        (ctx.out_dir / "free_run.json").write_text(json.dumps(results["backward"].series))  # the curves, per iter
    verdict = {
        "model": name,
        "passed": all(r.passed for r in results.values()),
        "steps": {s: rep.step_summary(r) for s, r in results.items()},
        "trace": {
            "first_divergent_forward": fwd.first_divergent if fwd else None,
            "first_divergent_backward": bwd.first_divergent if bwd else None,
            "layers_forward": len(fwd.order) if fwd else 0,
            "layers_backward": len(bwd.order) if bwd else 0,
        },
        "out_dir": str(ctx.out_dir),
        "seconds": round(time.time() - t0, 2),
        "provenance": provenance,
    }
    if not keep_weights:
        _drop_weights(ctx.out_dir / "weights", weights)
    verdict["artifacts_bytes"] = _tree_bytes(ctx.out_dir)
    rep.write_verdict(ctx.out_dir, verdict)
    rep.write_report(ctx.out_dir, verdict, results, images)
    verdict["artifacts_bytes"] = _tree_bytes(ctx.out_dir)
    for step, res in results.items():
        if not res.passed:
            worst = verdict["steps"][step]["worst"] or {}
            msg = res.error or f"{len(res.failed_results)} of {len(res.results)} keys failed, worst {worst.get('key')}"
            log.error("%s: step %s FAILED: %s; first divergent module: %s", name, step, msg, res.first_divergent)
    if fwd and fwd.first_divergent:
        log.error("%s: forward trace: first divergent module: %s", name, fwd.first_divergent)
    if bwd and bwd.first_divergent:
        log.error("%s: backward trace: first divergent module: %s", name, bwd.first_divergent)
    # The models (four copies: float32 and float64 on both sides) and the step logs are released here, not at
    # some later cyclic-garbage pass: Paddle layers sit in reference cycles, and a test session or `--all` running
    # several alignments would otherwise hold every previous run's weights (measured: +6 GB per PSANet run).
    ctx._models.clear()
    del ctx, results, fwd, bwd
    gc.collect()
    return verdict
