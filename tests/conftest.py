"""Suite-wide pytest hooks.

The suite runs on pytest-xdist workers (tox: `-n 2 --dist loadfile --no-loadscope-reorder`): each module is one
unit of work, handed to the next idle worker in collection order. The longest modules are moved to the front so that
none of them starts last while the other worker sits idle; the order inside a module, and of all other modules, is
unchanged. Serial runs (`pytest`, the fast loop) only see the modules in that order.
"""
from __future__ import annotations

#: The longest modules, longest first: their share of a 2-worker run on 2 cores, measured with `--durations=0`.
FIRST = (
    "test_hrnet_ocr_psa_align.py",  # HRNet-W48 clean alignment with 2 backward iterations, 2 training runs, bugs
    "test_recipe.py",               # every shipped config aligned
    "test_pointrend_align.py",      # R-101 clean alignment
    "test_psanet.py",
    "test_alignment.py",
    "test_danet.py",
    "test_trainer.py",              # SIGKILL + resume, 2-process training
    "test_hrnet_ocr_psa.py",
    "test_specs.py",
    "test_trainer_faults.py",
)


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(FIRST)))  # stable: the rest keep their order
