"""The bundled demo speech model: a tiny Whisper this project trains on synthetic Mandarin (espeak-ng)."""

from __future__ import annotations

from pathlib import Path


def bundled_speech_model() -> Path:
    """Directory of the demo speech checkpoint shipped inside the package."""
    return Path(__file__).resolve().parent / "checkpoint"
