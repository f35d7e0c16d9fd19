"""tuwen.storage and tuwen.pipeline stay mypy --strict clean (configuration in pyproject.toml).

mypy does not run the editable install's import hook, so it reads the packages through a folder of
links laid out as the wheel lays them out (tuwen/pipeline, tuwen/storage, ...).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(300)
def test_storage_and_pipeline_are_mypy_strict_clean(tmp_path: Path) -> None:
    tree = tmp_path / "tuwen"
    tree.mkdir()
    (tree / "__init__.py").symlink_to(ROOT / "tuwen" / "__init__.py")
    for layer in ("storage", "pipeline", "workers"):
        (tree / layer).symlink_to(ROOT / layer)
    env = {**os.environ, "MYPYPATH": str(tmp_path)}
    out = subprocess.run([sys.executable, "-m", "mypy", "--cache-dir", str(tmp_path / ".mypy_cache"),
                          "-p", "tuwen.storage", "-p", "tuwen.pipeline"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=280)
    assert out.returncode == 0, out.stdout[-4000:]
    assert "Success" in out.stdout
