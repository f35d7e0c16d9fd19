"""The wheel adds exactly one import name, ``tuwen``, and the README's snippet runs beside a ``./storage``.

Built from this checkout, installed without dependencies into a fresh venv that borrows the test venv's
third-party packages (a ``.pth`` line, which does not activate this checkout's editable install).
"""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(out), str(ROOT)], check=True, capture_output=True, timeout=300)
    (found,) = out.glob("tuwen-*.whl")
    return found


@pytest.fixture(scope="module")
def fresh_python(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    env_dir = tmp_path_factory.mktemp("venv")
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                               capture_output=True, text=True, check=True).stdout.strip())
    (site / "borrowed.pth").write_text(sysconfig.get_path("purelib") + "\n")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    return python


def test_the_wheel_holds_one_top_level_package(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert tops == {"tuwen"}, tops
    assert "tuwen/workers/demo/checkpoint/model.safetensors" in names
    assert "tuwen/pipeline/client.py" in names and "tuwen/storage/s3.py" in names
    assert "entry_points.txt" in " ".join(names)
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "tuwen = tuwen.workers.cli:main" in zipfile.ZipFile(wheel).read(entry).decode()


def test_generic_names_are_not_installed(fresh_python: Path, tmp_path: Path) -> None:
    for name in ("storage", "pipeline", "workers"):
        probe = subprocess.run([str(fresh_python), "-I", "-c", f"import {name}"], capture_output=True, text=True,
                               cwd=tmp_path)
        assert probe.returncode != 0 and "ModuleNotFoundError" in probe.stderr, (name, probe.stderr)
    ok = subprocess.run([str(fresh_python), "-I", "-c", "import tuwen.pipeline.client, tuwen.storage.images, "
                         "tuwen.workers.cli; from tuwen import Client; print(Client.__module__)"],
                        capture_output=True, text=True, cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip() == "tuwen.pipeline.client"


def test_readme_snippet_runs_beside_a_storage_folder(fresh_python: Path, tmp_path: Path) -> None:
    """The user's folder holds ./storage (TUWEN_STORAGE_DIR's own default is .tuwen/storage) and a
    ./pipeline of their own: neither shadows tuwen's modules."""
    (tmp_path / "storage").mkdir()
    (tmp_path / "storage" / "images.py").write_text("raise SystemExit('the user module was imported')\n")
    (tmp_path / "pipeline").mkdir()
    (tmp_path / "pipeline" / "__init__.py").write_text("MINE = True\n")
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    snippet = readme.split("```python\n", 1)[1].split("```", 1)[0]
    assert "from tuwen import Client" in snippet
    # Build the client only: the snippet's submit needs services the other tests start.
    head = "\n".join(line for line in snippet.splitlines() if "client." not in line and "result" not in line)
    code = head + "\nimport pipeline, json\nprint(json.dumps([type(client).__module__, pipeline.MINE]))\n"
    out = subprocess.run([str(fresh_python), "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == ["tuwen.pipeline.client", True]
