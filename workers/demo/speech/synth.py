"""Synthetic Mandarin speech: Debian's ``espeak-ng`` reads a sentence, then a room and a noise are added.

Everything that varies is drawn from a seed, so a clip is reproducible from ``(text, seed, conditions)``:
speaking rate, pitch, word gap, the voice variant (``cmn-latn-pinyin+f2``...), a room echo (an impulse
response of exponentially decaying noise with a random RT60), additive white/pink noise at a random
signal-to-noise ratio, gain and the silence around the speech.

``TRAIN`` and ``HELD_OUT`` draw speaking rates and noise levels from disjoint ranges: the evaluation
hears rates and noise levels that training never did.

The voice is espeak-ng's Mandarin (``cmn``) with hanzi read as pinyin (``cmn-latn-pinyin``). The plain
``cmn`` voice in Debian 12 reads many hanzi through English letter-to-sound rules ("图" as "t-u"), which
no Mandarin speaker sounds like. No torch here: numpy and a subprocess.
"""

from __future__ import annotations

import io
import math
import random
import subprocess
import wave
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SAMPLE_RATE = 16_000
#: espeak-ng's Mandarin voice that reads hanzi as pinyin; variants are appended as ``+name``.
VOICE = "cmn-latn-pinyin"
#: espeak-ng voice variants (``espeak-ng-data/voices/!v``): male, female and the Klatt synthesiser's.
VARIANTS: tuple[str, ...] = (
    "", "m1", "m2", "m3", "m5", "m6", "m7", "f1", "f2", "f3", "f5", "klatt", "klatt2", "klatt3", "klatt4",
    "croak", "whisper", "grandma", "grandpa", "edward", "aunty", "linda", "steph", "robert",
)
#: Never used in training: heard only by the evaluation's "unseen voices" row.
UNSEEN_VARIANTS: tuple[str, ...] = ("m4", "f4", "klatt5", "benjamin")


@dataclass(frozen=True)
class Conditions:
    """Where a clip's random settings are drawn from. Ranges are ``(low, high)`` pairs, inclusive."""

    #: espeak-ng words per minute (``-s``); a clip draws one range, then a value in it.
    rates: tuple[tuple[int, int], ...]
    #: Signal-to-noise ratios in dB; ``None`` in the tuple stands for no noise at all.
    snrs: tuple[tuple[float, float] | None, ...]
    variants: tuple[str, ...] = VARIANTS
    pitch: tuple[int, int] = (20, 85)
    #: Room reverberation time RT60 in seconds (0: a dry clip), drawn when ``echo_chance`` says so.
    rt60: tuple[float, float] = (0.15, 0.7)
    echo_chance: float = 0.5
    #: Seconds of silence (with the noise) before and after the speech.
    pad: tuple[float, float] = (0.05, 0.6)


#: Training: rates 130-330 wpm less two held-out bands, SNR 5-40 dB less two held-out bands, or clean.
TRAIN = Conditions(
    rates=((130, 155), (166, 225), (236, 330)),
    snrs=(None, (5.0, 11.0), (15.0, 22.0), (26.0, 40.0)),
)
#: Evaluation: only rates and noise levels from the bands that ``TRAIN`` leaves out.
HELD_OUT = Conditions(rates=((157, 164), (227, 234)), snrs=((12.0, 14.0), (23.0, 25.0)))


@dataclass(frozen=True)
class Voice:
    """Every random setting of one clip."""

    rate: int
    pitch: int
    variant: str
    word_gap: int
    snr_db: float | None
    noise_colour: float  # 0 = white ... 1 = pink
    rt60: float  # 0 = no echo
    gain: float
    pad_before: float
    pad_after: float

    @classmethod
    def draw(cls, rng: random.Random, conditions: Conditions) -> Voice:
        low, high = rng.choice(conditions.rates)
        snr = rng.choice(conditions.snrs)
        return cls(
            rate=rng.randint(low, high),
            pitch=rng.randint(*conditions.pitch),
            variant=rng.choice(conditions.variants),
            word_gap=rng.choice((0, 0, 0, 1, 2)),
            snr_db=None if snr is None else round(rng.uniform(*snr), 2),
            noise_colour=rng.random(),
            rt60=round(rng.uniform(*conditions.rt60), 3) if rng.random() < conditions.echo_chance else 0.0,
            gain=10 ** (rng.uniform(-12.0, 3.0) / 20),
            pad_before=rng.uniform(*conditions.pad),
            pad_after=rng.uniform(*conditions.pad),
        )


def espeak(text: str, voice: Voice) -> tuple[np.ndarray, int]:
    """The dry clip as espeak-ng renders it (float32 in [-1, 1], espeak's own sample rate)."""
    name = VOICE + (f"+{voice.variant}" if voice.variant else "")
    args = ["espeak-ng", "-v", name, "-s", str(voice.rate), "-p", str(voice.pitch), "-g", str(voice.word_gap),
            "-b", "1", "--stdout", text]
    raw = subprocess.run(args, capture_output=True, check=True, timeout=30).stdout
    # --stdout writes a streaming header (sizes 0x7fffffff): read the format, then the samples after "data".
    if raw[:4] != b"RIFF" or raw[8:12] != b"WAVE":
        raise RuntimeError(f"espeak-ng wrote no WAV for {text!r}")
    rate = int.from_bytes(raw[24:28], "little")
    start = raw.index(b"data", 12) + 8
    pcm = np.frombuffer(raw[start:start + (len(raw) - start) // 2 * 2], dtype="<i2")
    return pcm.astype(np.float32) / 32768.0, rate


def resample(audio: np.ndarray, source: int, target: int) -> np.ndarray:
    """Band-limited resampling of a whole clip through its spectrum (clips are a few seconds).

    The clip is zero-padded to ``source / gcd`` times a power of two, so both transforms have smooth sizes
    (22050 -> 16000 Hz: 441·2^k in, 320·2^k out) and the padding maps onto a whole number of samples."""
    if source == target:
        return audio.astype(np.float32)
    g = math.gcd(source, target)
    a, b = source // g, target // g
    blocks = 1 << max(0, math.ceil(len(audio) / a) - 1).bit_length()
    n_in, n_out = a * blocks, b * blocks
    spectrum = np.fft.rfft(audio, n_in)
    keep = min(len(spectrum), n_out // 2 + 1)
    out = np.fft.irfft(spectrum[:keep], n_out) * (n_out / n_in)
    return out[: int(round(len(audio) * target / source))].astype(np.float32)


def room(audio: np.ndarray, rt60: float, rng: np.random.Generator, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Convolve with a synthetic room: a direct path plus exponentially decaying noise (RT60 seconds)."""
    n = int(rt60 * sample_rate)
    t = np.arange(n) / sample_rate
    tail = rng.standard_normal(n) * np.exp(-6.9 * t / rt60)  # -60 dB at rt60
    tail[: int(0.004 * sample_rate)] = 0.0  # the first reflections arrive a few ms after the direct sound
    impulse = np.concatenate([[1.0], 0.35 * tail / np.sqrt(np.sum(tail**2) + 1e-9)])
    size = len(audio) + len(impulse) - 1
    fft_size = 1 << (size - 1).bit_length()
    wet = np.fft.irfft(np.fft.rfft(audio, fft_size) * np.fft.rfft(impulse, fft_size), fft_size)[:size]
    return wet.astype(np.float32)


def noise(n: int, colour: float, rng: np.random.Generator) -> np.ndarray:
    """Unit-power noise between white (0) and pink (1)."""
    size = 1 << max(0, n - 1).bit_length()
    white = rng.standard_normal(size)
    if colour <= 0:
        return white[:n]
    spectrum = np.fft.rfft(white)
    freqs = np.arange(len(spectrum), dtype=np.float64)
    freqs[0] = 1.0
    shaped = np.fft.irfft(spectrum / freqs ** (colour / 2), size)[:n]
    return shaped / (np.std(shaped) + 1e-12)


def render(text: str, voice: Voice, seed: int) -> np.ndarray:
    """The clip for ``voice`` at ``SAMPLE_RATE``: espeak-ng, resampled, then ``finish``."""
    dry, rate = espeak(text, voice)
    return finish(resample(dry, rate, SAMPLE_RATE), voice, seed)


def finish(speech: np.ndarray, voice: Voice, seed: int) -> np.ndarray:
    """Silence around a dry clip, then the room, the noise and the gain of ``voice`` (random parts from ``seed``)."""
    rng = np.random.default_rng(seed)
    speech = np.concatenate([np.zeros(int(voice.pad_before * SAMPLE_RATE), np.float32), speech,
                             np.zeros(int(voice.pad_after * SAMPLE_RATE), np.float32)])
    if voice.rt60 > 0:
        speech = room(speech, voice.rt60, rng)
    peak = float(np.max(np.abs(speech))) or 1.0
    speech = speech / peak * 0.7
    if voice.snr_db is not None:
        loud = np.abs(speech) > 0.01
        power = float(np.mean(speech[loud] ** 2)) if np.any(loud) else 1e-4
        speech = speech + noise(len(speech), voice.noise_colour, rng) * np.sqrt(power / 10 ** (voice.snr_db / 10))
    return np.clip(speech * voice.gain, -1.0, 1.0).astype(np.float32)


def speak(
    text: str, *, seed: int, conditions: Conditions = TRAIN, voice: Voice | None = None
) -> tuple[np.ndarray, int]:
    """Say ``text`` in Mandarin with every setting drawn from ``seed``: ``(float32 mono samples, 16000)``.

    ``voice`` fixes the settings instead of drawing them (the noise and the room still come from ``seed``).
    """
    chosen = voice or Voice.draw(random.Random(seed), conditions)
    return render(text, chosen, seed), SAMPLE_RATE


def wav_bytes(audio: np.ndarray, sample_rate: int = SAMPLE_RATE) -> bytes:
    """Mono 16-bit PCM WAV (what every decoder reads), in memory: for uploads in tests and the demo."""
    buffer = io.BytesIO()
    pcm = (np.clip(audio, -1.0, 1.0) * 32767).round().astype("<i2")
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(sample_rate)
        out.writeframes(pcm.tobytes())
    return buffer.getvalue()


def write_wav(path: Path | str, audio: np.ndarray, sample_rate: int = SAMPLE_RATE) -> Path:
    """The same WAV, written to ``path``."""
    path = Path(path)
    path.write_bytes(wav_bytes(audio, sample_rate))
    return path
