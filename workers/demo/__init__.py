"""The bundled demo: a tiny LLaVA-1.5 this project trains on CPU, its pictures and the commands around it."""

from __future__ import annotations

from pathlib import Path


def bundled_demo_model() -> Path:
    """Directory of the demo checkpoint shipped inside the package."""
    return Path(__file__).resolve().parent / "checkpoint"
