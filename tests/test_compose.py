"""docker-compose.yml validates offline with Debian's docker-compose v1 (no engine needed), requires its
secrets, and its tuwen services refuse the example secrets of .env.example at start."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from tuwen.pipeline.settings import Settings, is_placeholder
from tests.conftest import need

ROOT = Path(__file__).resolve().parents[1]
TUWEN_SERVICES = ("worker", "gateway", "flower")
SECRETS = ("TUWEN_REDIS_PASSWORD", "TUWEN_MINIO_SECRET_KEY", "FLOWER_BASIC_AUTH", "RABBITMQ_PASSWORD")
REAL = {"TUWEN_REDIS_PASSWORD": "9f2c61d0a7b34e1c8d5e", "TUWEN_MINIO_SECRET_KEY": "Zq4t8w1x7v3b9n2m5k6j",
        "FLOWER_BASIC_AUTH": "ops:Rt5u8i1o4p7a2s6d", "RABBITMQ_PASSWORD": "c3d9e2f7a1b6c8d4e5f0"}


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


def rendered(env: dict[str, str]) -> dict[str, Any]:
    out = compose("config", env=env)
    assert out.returncode == 0, out.stderr
    return yaml.safe_load(out.stdout)["services"]  # type: ignore[no-any-return]


def settings_of(service: dict[str, Any]) -> Settings:
    """The Settings a service's container builds from its TUWEN_* environment."""
    env = service.get("environment") or {}
    return Settings(**{k.removeprefix("TUWEN_").lower(): v for k, v in env.items()  # type: ignore[arg-type]
                       if k.startswith("TUWEN_") and v not in ("", None)})


@pytest.fixture(scope="module")
def have_compose() -> None:
    need(shutil.which("docker-compose") is not None, "docker-compose (v1) is not installed")


@pytest.mark.timeout(120)
def test_compose_file_lints_and_requires_secrets(have_compose: None) -> None:
    env = env_from_example()
    for profile in ([], ["--profile", "rabbitmq"]):
        out = compose(*profile, "config", "-q", env=env)
        assert out.returncode == 0, out.stderr
    # Secrets are never defaulted in the file: without one the config is refused.
    for secret in SECRETS:
        missing = compose("config", "-q", env={k: v for k, v in env.items() if k != secret})
        assert missing.returncode != 0 and secret in missing.stderr, secret
    text = compose("config", env=env).stdout
    assert "redis-server" in text and "--appendonly" in text
    assert "capabilities:\n              - gpu" in text or "- gpu" in text
    assert "TUWEN_QUANTIZATION: nf4" in text
    assert "FLOWER_BASIC_AUTH" in text


@pytest.mark.timeout(120)
def test_the_gateway_is_a_service_behind_the_same_secrets(have_compose: None) -> None:
    services = rendered(env_from_example())
    gateway = services["gateway"]
    assert gateway["command"] == ["gateway", "serve"] and gateway["image"] == services["worker"]["image"]
    assert gateway["environment"]["TUWEN_GATEWAY_HOST"] == "0.0.0.0"
    for name in TUWEN_SERVICES:
        env = services[name]["environment"]
        assert env["TUWEN_REDIS_URL"].startswith("redis://:change-me-redis-password@redis:6379/")
        assert env["TUWEN_MINIO_SECRET_KEY"] == services["minio"]["environment"]["MINIO_ROOT_PASSWORD"]
    # Every published port is on this host only; Redis gets its password from a file, not its argv.
    for name, service in services.items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), (name, port)
    assert "change-me-redis-password" not in " ".join(services["redis"]["command"])
    assert services["flower"]["command"][:1] == ["flower"]  # `tuwen flower`: credentials via environment


@pytest.mark.timeout(120)
def test_services_refuse_the_example_secrets_and_accept_real_ones(have_compose: None) -> None:
    example = rendered(env_from_example())
    for name in TUWEN_SERVICES:
        with pytest.raises(ValidationError) as refused:
            settings_of(example[name])
        message = str(refused.value)
        assert "TUWEN_MINIO_SECRET_KEY" in message and "the password in TUWEN_REDIS_URL" in message, name
        assert "still has an example value" in message
        assert "change-me-to-a-long-random-string" not in message  # never echoes a secret
    assert is_placeholder(example["flower"]["environment"]["FLOWER_BASIC_AUTH"].partition(":")[2])
    real = rendered({**env_from_example(), **REAL})
    for name in TUWEN_SERVICES:
        settings = settings_of(real[name])
        assert settings.redis_url == f"redis://:{REAL['TUWEN_REDIS_PASSWORD']}@redis:6379/0"
    assert not is_placeholder(real["flower"]["environment"]["FLOWER_BASIC_AUTH"].partition(":")[2])


@pytest.mark.timeout(120)
def test_the_demo_profile_runs_the_bundled_model_on_a_cpu_and_the_gpu_profile_stays(have_compose: None) -> None:
    env = {**env_from_example(), **REAL}
    # Given the file with each profile: it lints (v1 renders every service whatever the profile)
    for profile in ("demo", "gpu"):
        out = compose("--profile", profile, "config", "-q", env=env)
        assert out.returncode == 0, (profile, out.stderr)
    assert compose("config", "--profiles", env=env).stdout.split() == ["demo", "gpu", "rabbitmq"]
    services = rendered(env)
    demo, gpu = services["worker-demo"], services["worker"]
    assert demo["profiles"] == ["demo"] and gpu["profiles"] == ["gpu"]
    # Then the demo worker needs no GPU and no model directory: the image's bundled demo model, on the CPU
    assert "deploy" not in demo and not demo.get("volumes")
    settings = settings_of(demo)
    assert settings.device == "cpu" and settings.model_path is None and settings.quantization.value == "none"
    assert demo["command"][:1] == ["worker"] and demo["image"] == gpu["image"] == services["gateway"]["image"]
    # And the GPU worker is as it was: a GPU reserved, the checkpoint mounted, nf4
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"] and settings_of(gpu).quantization.value == "nf4"
    assert any(str(v).endswith(":/models/checkpoint:ro") or "/models/checkpoint" in str(v) for v in gpu["volumes"])
    # And Redis, MinIO, the gateway and Flower start with either profile
    for name in ("redis", "minio", "minio-init", "gateway", "flower"):
        assert "profiles" not in services[name], name
