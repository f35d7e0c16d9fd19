"""docker-compose.yml validates offline with Debian's docker-compose v1 (no engine needed)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import need

ROOT = Path(__file__).resolve().parents[1]


def env_from_example() -> dict[str, str]:
    env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp")}
    for line in (ROOT / ".env.example").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition("=")
            env[key] = value
    return env


def compose(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["docker-compose", "-f", str(ROOT / "docker-compose.yml"), *args],
                          env=env, capture_output=True, text=True, timeout=60, cwd=ROOT)


@pytest.mark.timeout(120)
def test_compose_file_lints_and_requires_secrets() -> None:
    need(shutil.which("docker-compose") is not None, "docker-compose (v1) is not installed")
    env = env_from_example()
    for profile in ([], ["--profile", "rabbitmq"]):
        out = compose(*profile, "config", "-q", env=env)
        assert out.returncode == 0, out.stderr
    # Secrets are never defaulted in the file: without them the config is refused.
    missing = compose("config", "-q", env={k: v for k, v in env.items() if k != "TUWEN_MINIO_SECRET_KEY"})
    assert missing.returncode != 0 and "TUWEN_MINIO_SECRET_KEY" in missing.stderr
    rendered = compose("config", env=env).stdout
    assert "redis-server" in rendered and "--appendonly" in rendered
    assert "capabilities:\n              - gpu" in rendered or "- gpu" in rendered
    assert "TUWEN_QUANTIZATION: nf4" in rendered
    assert "FLOWER_BASIC_AUTH" in rendered
