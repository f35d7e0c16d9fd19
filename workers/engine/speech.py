"""The speech runtime: one loaded speech-to-text model that transcribes batches of audio.

Generic Hugging Face path only (``AutoProcessor`` + ``AutoModelForSpeechSeq2Seq``), so any local Whisper-family
checkpoint directory works: whisper-small, large-v3, a fine-tuned Chinese one, the demo's tiny one. fp32 and
greedy: Whisper's feature extractor pads every clip to the same 30 s window, so a clip transcribed in a
batch gives the same tokens as transcribed alone (tests/workers/test_speech.py checks).
"""

from __future__ import annotations

import hashlib
import logging
import time
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoModelForSpeechSeq2Seq, AutoProcessor

from tuwen.pipeline.errors import ModelError
from tuwen.pipeline.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Transcript:
    text: str
    tokens: int
    #: ``stop`` (the model ended it) or ``length`` (``TUWEN_SPEECH_MAX_NEW_TOKENS``).
    finish_reason: str


class SpeechRuntime:
    """Owns one speech model; ``transcribe`` is the only hot path."""

    def __init__(self, settings: Settings) -> None:
        if settings.speech_model_path is None:
            raise ModelError("no speech checkpoint: set TUWEN_SPEECH_MODEL_PATH (or --model-path)",
                             code="model_not_found")
        self.settings = settings
        self.model_path = Path(settings.speech_model_path)
        self.model: Any = None
        self.processor: Any = None
        self.load_seconds: float | None = None

    @property
    def model_id(self) -> str:
        config = self.model_path / "config.json"
        digest = hashlib.sha256(config.read_bytes() if config.exists() else b"").hexdigest()[:8]
        return f"{self.model_path.name}@{digest}"

    @property
    def device(self) -> str:
        if self.settings.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.settings.device

    @property
    def rate(self) -> int:
        """The sample rate the model hears (Whisper: 16 kHz); audio is resampled to it."""
        return int(self.processor.feature_extractor.sampling_rate)

    def load(self) -> None:
        if self.model is not None:
            return
        if not (self.model_path / "config.json").exists():
            raise ModelError(f"no config.json in {self.model_path}", code="model_not_found")
        t0 = time.perf_counter()
        if self.settings.torch_threads:
            torch.set_num_threads(self.settings.torch_threads)
        self.processor = AutoProcessor.from_pretrained(self.model_path)
        model = AutoModelForSpeechSeq2Seq.from_pretrained(self.model_path, dtype=torch.float32)
        self.model = model.to(self.device).eval()
        self.load_seconds = time.perf_counter() - t0
        log.info("speech model %s loaded in %.2fs on %s", self.model_id, self.load_seconds, self.device)

    @torch.inference_mode()
    def transcribe(self, clips: Sequence[np.ndarray[Any, np.dtype[np.float32]]]) -> list[Transcript]:
        """Transcripts of mono clips at ``rate`` Hz, in order, from one batched greedy generate. A clip longer
        than the model's window (Whisper: 30 s) is cut into windows, each a row, and their texts joined."""
        self.load()
        window = int(self.processor.feature_extractor.n_samples)
        rows: list[np.ndarray[Any, np.dtype[np.float32]]] = []
        owners: list[int] = []
        for i, clip in enumerate(clips):
            for start in range(0, max(len(clip), 1), window):
                rows.append(clip[start:start + window])
                owners.append(i)
        pieces = self._generate(rows)
        out = []
        for i in range(len(clips)):
            mine = [p for p, owner in zip(pieces, owners) if owner == i]
            out.append(Transcript("".join(p.text for p in mine).strip(), sum(p.tokens for p in mine),
                                  "length" if any(p.finish_reason == "length" for p in mine) else "stop"))
        return out

    def _generate(self, rows: list[np.ndarray[Any, np.dtype[np.float32]]]) -> list[Transcript]:
        inputs = self.processor.feature_extractor(rows, sampling_rate=self.rate, return_tensors="pt")
        features = inputs["input_features"].to(self.device, torch.float32)
        # Room in the decoder for the prompt (Whisper's start, language, task and timestamp tokens) and the text.
        budget = min(self.settings.speech_max_new_tokens, int(self.model.config.max_target_positions) - 4)
        out = self.model.generate(input_features=features, max_new_tokens=budget, do_sample=False, num_beams=1)
        sequences = out.sequences if hasattr(out, "sequences") else out
        tokenizer = self.processor.tokenizer
        special = set(tokenizer.all_special_ids)
        results = []
        for row in sequences.tolist():
            words = [t for t in row if t not in special]
            # Whisper's generate drops a lone row's closing end-of-text: a row that stopped short of its budget ended
            ended = tokenizer.eos_token_id in row[1:] or len(words) < budget
            text = readable(tokenizer.decode(words, skip_special_tokens=True)).strip()
            results.append(Transcript(text, len(words), "stop" if ended else "length"))
        return results


def readable(text: str) -> str:
    """A transcript as a question may be: without control, surrogate, private-use or unassigned characters (a
    byte-level tokenizer can decode them from a model that is unsure), which a follow-up turn would be refused for."""
    return "".join(ch for ch in text if ch in "\n\t" or unicodedata.category(ch) not in ("Cc", "Cs", "Co", "Cn"))
