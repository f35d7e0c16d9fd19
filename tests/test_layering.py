"""Imports point one way: storage <- pipeline <- workers. A producer never loads torch."""

from __future__ import annotations

import subprocess
import sys

import pytest


def loaded_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys; print('\\n'.join(sys.modules))"],
                         capture_output=True, text=True, timeout=120, check=True)
    return set(out.stdout.split())


@pytest.mark.timeout(200)
def test_producer_side_never_imports_torch_or_workers() -> None:
    mods = loaded_after("import pipeline.client, pipeline.cli, pipeline.gateway, pipeline.bulk, pipeline.mmbench")
    assert not {m for m in mods if m.split(".")[0] in ("torch", "transformers", "bitsandbytes", "workers")}


@pytest.mark.timeout(200)
def test_storage_imports_nothing_of_ours() -> None:
    mods = loaded_after("import storage.factory, storage.images, storage.s3, storage.local")
    assert not {m for m in mods if m.split(".")[0] in ("pipeline", "workers")}
