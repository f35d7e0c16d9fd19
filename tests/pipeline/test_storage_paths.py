"""Where pictures are kept by default: one absolute per-user directory, the same for every command of one user
whatever folder it starts in (a bulk submitted from another folder than the worker's stored its pictures where
the worker never looked); the tests' own is a temporary one."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tuwen.pipeline.settings import Settings
from tuwen.pipeline.stores import open_objects
from tests.conftest import DATA_HOME

SHOW = "from tuwen.pipeline.settings import Settings; print(Settings().storage_dir)"


def storage_dir_from(cwd: Path, **env: str) -> str:
    base = {k: v for k, v in os.environ.items() if not k.startswith("TUWEN_") and k != "XDG_DATA_HOME"}
    out = subprocess.run([sys.executable, "-c", SHOW], cwd=cwd, env={**base, **env}, capture_output=True, text=True,
                         timeout=60, check=True)
    return out.stdout.strip()


def test_the_default_is_the_users_data_directory_from_any_folder(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    xdg = str(tmp_path / "xdg")
    assert storage_dir_from(tmp_path / "a", XDG_DATA_HOME=xdg) == storage_dir_from(tmp_path / "b", XDG_DATA_HOME=xdg) \
        == f"{xdg}/tuwen/storage"
    # Without XDG_DATA_HOME (or with a relative one, which the spec says to ignore): ~/.local/share
    home = str(tmp_path / "home")
    assert storage_dir_from(tmp_path / "a", HOME=home) == f"{home}/.local/share/tuwen/storage"
    assert storage_dir_from(tmp_path / "a", HOME=home, XDG_DATA_HOME="rel") == f"{home}/.local/share/tuwen/storage"
    # A relative TUWEN_STORAGE_DIR is made absolute once, where the process started (children get that path)
    assert storage_dir_from(tmp_path / "a", TUWEN_STORAGE_DIR="pics") == f"{tmp_path}/a/pics"
    assert Settings(storage_dir=Path("~/pics")).storage_dir == Path.home() / "pics"


def test_the_tests_never_use_the_real_data_directory() -> None:
    assert os.environ["XDG_DATA_HOME"] == os.environ[DATA_HOME]
    assert Settings().storage_dir == Path(os.environ[DATA_HOME]) / "tuwen" / "storage"
    assert not Settings().storage_dir.is_relative_to(Path.home() / ".local")


def test_every_process_logs_where_its_pictures_are(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="tuwen.storage"):
        open_objects(Settings(storage_dir=tmp_path / "pics"))
    assert f"pictures are stored in the directory {tmp_path}/pics (TUWEN_STORAGE_DIR)" in caplog.text
