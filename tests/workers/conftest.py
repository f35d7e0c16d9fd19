"""``tiny_checkpoint(name)``: each family's tiny random checkpoint (``tests.workers.test_families``), built once per
test run and shared, read-only, by every test and every pytest-xdist worker of that run."""

from __future__ import annotations

import fcntl
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest


def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """This run's temporary root: the same folder for every pytest-xdist worker (each has its own below it)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """The checkpoint of the family called ``name``; the first worker to ask builds it (under a file lock, into
    a folder renamed into place when complete), the others wait for it and load the same files."""
    from tests.workers.test_families import FAMILIES, _have

    root = run_dir(tmp_path_factory) / "tiny-checkpoints"
    root.mkdir(exist_ok=True)

    def get(name: str) -> Path:
        family = next(f for f in FAMILIES if f.name == name)
        assert _have(name), f"this transformers has no {name}"
        path = root / name
        with (root / f"{name}.lock").open("w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not path.exists():
                building = root / f"{name}.building"
                shutil.rmtree(building, ignore_errors=True)  # what a crashed build left
                building.mkdir()
                family.build(building)
                building.rename(path)
        return path

    return get
