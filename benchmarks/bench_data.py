"""Data pipeline throughput (pytest-benchmark): images/s of the PSANet Paddle recipe's train pipeline at the
Cityscapes 1024x512 crop, through ``paddle.io.DataLoader`` with 0, 1 and 2 workers.

    pytest benchmarks/bench_data.py --benchmark-only -q -o python_files=bench_*.py      # or: tox -e bench

Data: 8 synthetic Cityscapes frames of 1024x2048 (official layout, written once per session in a tmp dir).
Pipeline (the PSANet Paddle port's recipe, docs/references.md section 3): ResizeStepScaling(0.5, 2.0, 0.25)
-> RandomPaddingCrop([1024, 512]) -> RandomHorizontalFlip -> RandomDistort(0.4, 0.4, 0.4) -> Normalize(semseg)
-> ToCHW; batch 2. One round = one epoch over the 8 frames (worker start-up included, as in training without
persistent workers). Reported: ``extra_info["img_per_s"]`` (8 / median round time); the baseline of the group is
num_workers=0. Nothing asserts a wall time. The machine's core count bounds what more workers can give (the CI box
has 2).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from conftest import THREADS  # also exports it as OMP_NUM_THREADS, before any framework is imported

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pytest  # noqa: E402

N_IMAGES = 8
BATCH = 2
SPECS = [
    {"type": "ResizeStepScaling", "min_scale_factor": 0.5, "max_scale_factor": 2.0, "scale_step_size": 0.25},
    {"type": "RandomPaddingCrop", "crop_size": [1024, 512]},
    {"type": "RandomHorizontalFlip"},
    {"type": "RandomDistort", "brightness_range": 0.4, "contrast_range": 0.4, "saturation_range": 0.4},
    {"type": "Normalize", "preset": "semseg"},
    {"type": "ToCHW"},
]


@pytest.fixture(scope="module")
def cs_root(tmp_path_factory):
    from paddle_impl.datasets import write_cityscapes

    root = tmp_path_factory.mktemp("bench_data") / "cityscapes"
    write_cityscapes(root, n=N_IMAGES, size=(1024, 2048), splits=("train",), seed=0)
    return root


def _loader(root, workers):
    import paddle.io

    from paddle_impl.datasets import Cityscapes
    from paddle_impl.transforms import WorkerSeeder, build_transforms

    ds = Cityscapes(root, "train", transforms=build_transforms(SPECS))
    seeder = WorkerSeeder(seed=0)
    if workers == 0:
        seeder.main(ds)
    return paddle.io.DataLoader(ds, batch_size=BATCH, shuffle=True, drop_last=False, num_workers=workers,
                                worker_init_fn=seeder if workers else None, return_list=True)


@pytest.mark.parametrize("workers", [0, 1, 2])
def test_data_pipeline(benchmark, cs_root, workers):
    loader = _loader(cs_root, workers)
    benchmark.group = "data pipeline 1024x512 crop"

    def epoch():
        n = 0
        for images, labels in loader:
            assert list(images.shape[1:]) == [3, 512, 1024] and list(labels.shape[1:]) == [512, 1024]
            n += images.shape[0]
        return n

    n = benchmark.pedantic(epoch, rounds=3, iterations=1, warmup_rounds=0)
    assert n == N_IMAGES
    median = benchmark.stats.stats.median
    benchmark.extra_info.update(num_workers=workers, batch_size=BATCH, images=N_IMAGES, source="1024x2048",
                                crop="1024x512 (W x H)", threads=THREADS, cpu_count=os.cpu_count(),
                                img_per_s=round(N_IMAGES / median, 2), baseline=workers == 0)
    print(f"\nnum_workers={workers}: {N_IMAGES / median:.2f} img/s (median epoch {median:.2f} s)")
    np.testing.assert_equal(n, N_IMAGES)
