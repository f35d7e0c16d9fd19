"""The CI entry point runs the README's test command with CI set, whatever the CI system sets."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_ci_run_sets_ci_itself_and_runs_make_test(tmp_path: Path) -> None:
    # Given a CI system that does not set CI (a `make` on PATH that only records how it was called)
    record = tmp_path / "make-called"
    (tmp_path / "make").write_text(f'#!/bin/sh\necho "CI=$CI $*" > {record}\n')
    (tmp_path / "make").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env["PATH"] = f"{tmp_path}:{env['PATH']}"
    # When .ci/run runs
    subprocess.run(["bash", str(ROOT / ".ci" / "run")], env=env, check=True, timeout=30)
    # Then it ran `make test` with CI=1, so a missing service (or any skip) fails the run
    assert record.read_text().strip() == "CI=1 test"


def test_make_test_hands_each_test_out_in_its_xdist_group(request: pytest.FixtureRequest) -> None:
    """``make test`` runs pytest-xdist with ``--dist loadgroup``: tests/conftest.py puts a test outside the timing
    group in its module's group, and pytest-xdist must hand it out by that group (under pytest 9.2 it silently
    handed every test out alone, so a module's worker process or gateway was made on both xdist workers)."""
    assert [m.args for m in request.node.iter_markers("xdist_group")] == [("tests.test_ci",)]
    if getattr(request.config.option, "loadgroup", False):  # a pytest-xdist worker of `make test`
        assert request.node.nodeid.endswith("@tests.test_ci"), request.node.nodeid
