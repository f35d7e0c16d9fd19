"""Validation and decoding of spoken questions: untrusted audio bytes to mono float32 samples.

libsndfile (through ``soundfile``) reads WAV, FLAC, Ogg (Vorbis, Opus) and MP3; nothing else is accepted.
The producer decodes before anything is stored or queued; the speech worker decodes again what it fetched
(it trusts nothing) and resamples to its model's rate. Every refusal has a code of the catalogue.

Bounded work whatever the bytes say: the byte limit first, then the header's rate, channels and length,
then decoding block by block, which stops as soon as the duration limit is passed (a compressed file
whose header understates its length, a "zip bomb", is caught there without ever holding it whole).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import numpy as np
import soundfile

from tuwen.pipeline.errors import InvalidInput
from tuwen.pipeline.inputs import in_mib

#: Formats tuwen reads (libsndfile's names) and the content type each is stored with.
FORMATS = {"WAV": "audio/wav", "WAVEX": "audio/wav", "RF64": "audio/wav", "FLAC": "audio/flac", "OGG": "audio/ogg",
           "MP3": "audio/mpeg"}
#: The sample rates accepted: below 8 kHz speech is not intelligible, above 192 kHz it is not a recording.
MIN_RATE, MAX_RATE = 8_000, 192_000
#: Most channels accepted (mono and stereo recordings; channels are averaged to mono).
MAX_CHANNELS = 2
#: The loudest 30 ms of a question must reach this RMS level (about -50 dBFS), else it is silence.
SILENCE_RMS = 10 ** (-50 / 20)
#: Frames decoded at a time.
BLOCK = 65_536


class InvalidAudio(InvalidInput):
    code = "invalid_audio"


@dataclass(frozen=True)
class Sound:
    """Decoded audio: mono float32 samples in [-1, 1] at ``rate`` Hz."""

    samples: np.ndarray[Any, np.dtype[np.float32]]
    rate: int
    #: libsndfile's format name (``WAV``, ``FLAC``, ``OGG``, ``MP3``).
    format: str
    channels: int

    @property
    def seconds(self) -> float:
        return len(self.samples) / self.rate

    @property
    def content_type(self) -> str:
        return FORMATS[self.format]


def audio_too_large(limit: int, size: int | None = None) -> InvalidAudio:
    seen = f"it is {size} bytes" if size is not None else f"more than {limit} bytes arrived"
    return InvalidAudio(f"audio over {in_mib(limit)} ({seen}; TUWEN_MAX_AUDIO_BYTES is {limit})",
                        code="audio_too_large")


def decode_audio(data: bytes, *, max_bytes: int, max_seconds: float) -> Sound:
    """Decode untrusted bytes, or raise ``InvalidAudio`` with a precise code (``empty_audio``,
    ``audio_too_large``, ``unsupported_audio_format``, ``corrupt_audio``, ``bad_sample_rate``,
    ``too_many_channels``, ``audio_too_long``, ``no_speech``)."""
    if not data:
        raise InvalidAudio("the audio is empty (0 bytes)", code="empty_audio")
    if len(data) > max_bytes:
        raise audio_too_large(max_bytes, len(data))
    if data.startswith(b"RIFF") and data[8:12] == b"WAVE":
        _check_wav_chunks(data)
    try:
        sound = soundfile.SoundFile(io.BytesIO(data))
    except soundfile.LibsndfileError as exc:
        if _looks_like_audio(data):
            raise InvalidAudio(f"the audio's header is damaged: {exc.error_string}", code="corrupt_audio") from exc
        raise InvalidAudio("this is not an audio format tuwen reads (WAV, FLAC, Ogg, MP3)",
                           code="unsupported_audio_format") from exc
    except Exception as exc:  # noqa: BLE001 - libsndfile through cffi raises more than its own type
        raise InvalidAudio(f"the audio could not be read: {exc}", code="corrupt_audio") from exc
    with sound:
        return _read(sound, max_seconds)


def _read(sound: Any, max_seconds: float) -> Sound:
    fmt, rate, channels = str(sound.format), int(sound.samplerate), int(sound.channels)
    if fmt not in FORMATS:
        raise InvalidAudio(f"audio format {fmt} is not accepted (WAV, FLAC, Ogg, MP3)",
                           code="unsupported_audio_format")
    if not MIN_RATE <= rate <= MAX_RATE:
        raise InvalidAudio(f"the audio's sample rate is {rate} Hz; tuwen takes {MIN_RATE} to {MAX_RATE} Hz",
                           code="bad_sample_rate")
    if not 1 <= channels <= MAX_CHANNELS:
        raise InvalidAudio(f"the audio has {channels} channels; tuwen takes 1 or {MAX_CHANNELS}",
                           code="too_many_channels")
    limit = int(max_seconds * rate)
    if 0 < sound.frames < 2**62 and sound.frames > limit:  # libsndfile says 2**63-1 when it cannot tell
        raise _too_long(sound.frames / rate, max_seconds)
    blocks, got = [], 0
    try:
        while True:
            block = sound.read(BLOCK, dtype="float32", always_2d=True)
            if not len(block):
                break
            got += len(block)
            if got > limit:  # the header understated the length: decoding stops here
                raise _too_long(None, max_seconds)
            blocks.append(block.mean(axis=1, dtype=np.float32))
    except soundfile.LibsndfileError as exc:
        raise InvalidAudio(f"the audio data is damaged or truncated: {exc.error_string}",
                           code="corrupt_audio") from exc
    samples = np.concatenate(blocks) if blocks else np.zeros(0, np.float32)
    if not len(samples):
        raise InvalidAudio("the audio lasts 0 seconds", code="empty_audio")
    if not np.isfinite(samples).all():
        raise InvalidAudio("the audio holds samples that are not numbers", code="corrupt_audio")
    if loudest_rms(samples, rate) < SILENCE_RMS:
        raise InvalidAudio("the audio is silent: no speech to transcribe", code="no_speech")
    return Sound(np.clip(samples, -1.0, 1.0), rate, fmt, channels)


def _too_long(seconds: float | None, limit: float) -> InvalidAudio:
    said = f"lasts {seconds:.1f} s" if seconds is not None else "decodes to more"
    return InvalidAudio(f"the audio {said}; the limit is {limit:g} s (TUWEN_MAX_AUDIO_SECONDS)",
                        code="audio_too_long")


def loudest_rms(samples: np.ndarray[Any, np.dtype[np.float32]], rate: int) -> float:
    """The RMS level of the loudest 30 ms window."""
    window = max(1, int(rate * 0.03))
    usable = len(samples) - len(samples) % window
    if usable == 0:
        return float(np.sqrt(np.mean(np.square(samples, dtype=np.float64))))
    frames = samples[:usable].reshape(-1, window).astype(np.float64)
    return float(np.sqrt(np.mean(np.square(frames), axis=1)).max())


def _check_wav_chunks(data: bytes) -> None:
    """A WAV's ``data`` chunk must be whole: libsndfile quietly reads a truncated one as a shorter file."""
    pos = 12
    while pos + 8 <= len(data):
        chunk, size = data[pos:pos + 4], int.from_bytes(data[pos + 4:pos + 8], "little")
        if chunk == b"data":
            if size != 0xFFFFFFFF and pos + 8 + size > len(data):
                raise InvalidAudio(f"the WAV is truncated: its data chunk says {size} bytes, "
                                   f"{len(data) - pos - 8} are there", code="corrupt_audio")
            return
        pos += 8 + size + (size & 1)


_MAGIC = (b"RIFF", b"RIFX", b"RF64", b"fLaC", b"OggS", b"ID3", b"\xff\xfb", b"\xff\xf3", b"\xff\xf2")


def _looks_like_audio(data: bytes) -> bool:
    return data.startswith(_MAGIC)


def resample(samples: np.ndarray[Any, np.dtype[np.float32]], rate: int,
             target: int) -> np.ndarray[Any, np.dtype[np.float32]]:
    """``samples`` at ``target`` Hz: band-limited (windowed-sinc) interpolation, numpy only."""
    if rate == target or not len(samples):
        return samples.astype(np.float32, copy=False)
    n_out = int(round(len(samples) * target / rate))
    cutoff = min(1.0, target / rate)  # below the lower Nyquist frequency, no aliasing going down
    half = 16  # taps each side, in input samples scaled by the cutoff
    width = int(np.ceil(half / cutoff))
    t = np.arange(n_out) * (rate / target)  # output times in input samples
    left = np.floor(t).astype(np.int64)
    offsets = np.arange(-width + 1, width + 1)
    out = np.zeros(n_out, np.float64)
    padded = np.concatenate([np.zeros(width, np.float32), samples, np.zeros(width + 1, np.float32)])
    for start in range(0, n_out, 8192):  # bounded memory: (chunk x taps)
        idx = left[start:start + 8192, None] + offsets[None, :]
        dist = t[start:start + 8192, None] - idx
        kernel = cutoff * np.sinc(cutoff * dist) * 0.5 * (1 + np.cos(np.pi * np.clip(dist / width, -1, 1)))
        out[start:start + 8192] = (padded[idx + width] * kernel).sum(axis=1)
    return out.astype(np.float32)
