"""The bad-audio corpus: every spoken question tuwen cannot take gets a stable code through ``Client.submit``,
and nothing is stored or queued; the formats libsndfile reads are accepted (issue 28, part 4)."""

from __future__ import annotations

import io
import struct
from collections.abc import Callable

import numpy as np
import pytest
import soundfile

from tuwen.pipeline.audio import decode_audio, resample
from tuwen.pipeline.client import Client
from tuwen.pipeline.errors import InvalidInput
from tuwen.pipeline.settings import Settings
from tests.faults import report
from tests.reliability.test_bad_input import sample_png, state

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

RATE = 16_000


def tone(seconds: float = 1.0, rate: int = RATE, channels: int = 1, level: float = 0.3) -> np.ndarray:
    """A spoken-question stand-in: a 220 Hz tone with a little noise (loud enough not to be silence)."""
    t = np.arange(int(seconds * rate)) / rate
    wave = level * np.sin(2 * np.pi * 220 * t) + 0.01 * np.random.default_rng(0).standard_normal(len(t))
    return np.repeat(wave[:, None], channels, axis=1).astype(np.float32) if channels > 1 else wave.astype(np.float32)


def encode(samples: np.ndarray, fmt: str, rate: int = RATE, subtype: str | None = None) -> bytes:
    buf = io.BytesIO()
    soundfile.write(buf, samples, rate, format=fmt, subtype=subtype)
    return buf.getvalue()


def wav_header_claiming(seconds: float) -> bytes:
    """A WAV whose header declares ``seconds`` of 16-bit mono audio and holds 1 s of it."""
    body = encode(tone(1.0), "WAV", subtype="PCM_16")
    declared = int(seconds * RATE) * 2
    return body[:4] + struct.pack("<I", 36 + declared) + body[8:40] + struct.pack("<I", declared) + body[44:]


def flac_bomb(seconds: float = 70.0) -> bytes:
    """A FLAC of a few KiB that decodes to ``seconds`` of sound (a steady level: FLAC stores each block of it in
    a few bytes), whose header says nothing of its length, so that only decoding can tell how long it is."""
    data = bytearray(encode(np.full(int(seconds * RATE), 0.1, np.float32), "FLAC", subtype="PCM_16"))
    # STREAMINFO follows 'fLaC' and its block header (8 bytes): block and frame sizes (10 bytes), then 20 bits of
    # rate, 3 of channels, 5 of bits per sample, and 36 of total samples: the low nibble of byte 21 and bytes
    # 22-25. FLAC allows 0 there ("unknown").
    data[21] &= 0xF0
    data[22:26] = b"\x00\x00\x00\x00"
    return bytes(data)


#: name → (audio bytes, expected code)
REFUSED: dict[str, tuple[Callable[[], bytes], str]] = {
    "0 bytes": (lambda: b"", "empty_audio"),
    "0 seconds (a WAV with no frames)": (lambda: encode(np.zeros(0, np.float32), "WAV"), "empty_audio"),
    "truncated WAV": (lambda: encode(tone(2.0), "WAV")[:20_000], "corrupt_audio"),
    "WAV with a broken header": (lambda: b"RIFF\x24\x00\x00\x00WAVEfmt " + bytes(40), "corrupt_audio"),
    "truncated FLAC": (lambda: encode(tone(2.0), "FLAC")[:200], "corrupt_audio"),
    "Ogg header only": (lambda: encode(tone(2.0), "OGG", subtype="VORBIS")[:60], "corrupt_audio"),
    "a picture sent as audio": (sample_png, "unsupported_audio_format"),
    "plain text": (lambda: "请问图中有几个圆形？".encode(), "unsupported_audio_format"),
    "silence": (lambda: encode(np.zeros(RATE * 2, np.float32), "WAV"), "no_speech"),
    "near silence (-70 dBFS hiss)": (lambda: encode(tone(2.0, level=0.0) * 0.03, "FLAC"), "no_speech"),
    "over the duration limit (61 s)": (lambda: encode(tone(61.0, rate=8000), "FLAC", rate=8000), "audio_too_long"),
    "a header claiming an hour": (lambda: wav_header_claiming(3600), "corrupt_audio"),
    "compressed bomb (5 KiB of FLAC, unknown length, 70 s)": (flac_bomb, "audio_too_long"),
    "over the byte limit": (lambda: b"RIFF" + bytes(26 * 1024 * 1024), "audio_too_large"),
    "sample rate too low (4 kHz)": (lambda: encode(tone(1.0, rate=4000), "WAV", rate=4000), "bad_sample_rate"),
    "six channels": (lambda: encode(tone(1.0, channels=6), "WAV"), "too_many_channels"),
}

#: Formats that must be accepted: name → bytes builder.
ACCEPTED: dict[str, Callable[[], bytes]] = {
    "WAV 16-bit mono": lambda: encode(tone(), "WAV", subtype="PCM_16"),
    "WAV float stereo 44.1 kHz": lambda: encode(tone(rate=44_100, channels=2), "WAV", rate=44_100, subtype="FLOAT"),
    "FLAC": lambda: encode(tone(), "FLAC"),
    "Ogg Vorbis": lambda: encode(tone(), "OGG", subtype="VORBIS"),
    "Ogg Opus 48 kHz": lambda: encode(tone(rate=48_000), "OGG", rate=48_000, subtype="OPUS"),
    "MP3": lambda: encode(tone(rate=44_100), "MP3", rate=44_100),
}


def test_audio_corpus_is_refused_with_codes_and_nothing_stored(pipeline_settings: Settings) -> None:
    """Given a speech queue no worker reads, when each bad spoken question is submitted with a good picture,
    then each is refused with its code and nothing is stored or queued."""
    settings = pipeline_settings.model_copy(update={"speech_queue": "audio-corpus-probe"})
    client = Client(settings)
    before = state(client, "audio-corpus-probe")
    rows = {}
    for name, (build, code) in REFUSED.items():
        with pytest.raises(InvalidInput) as info:
            client.submit(sample_png(), audio=build())
        assert info.value.code == code, (name, info.value.code, info.value.message)
        assert info.value.message and not info.value.retryable
        rows[name] = code
    assert state(client, "audio-corpus-probe") == before
    report("bad-audio corpus", cases=len(REFUSED), refused_with_code=len(rows), stored=0, queued=0, table=rows)
    client.close()


@pytest.mark.parametrize("name", list(ACCEPTED))
def test_formats_libsndfile_reads_are_decoded_to_mono_at_their_rate(name: str) -> None:
    sound = decode_audio(ACCEPTED[name](), max_bytes=10**8, max_seconds=60)
    assert sound.samples.ndim == 1 and sound.samples.dtype == np.float32
    assert abs(sound.seconds - 1.0) < 0.1, sound.seconds  # MP3 and Opus pad a few ms


def test_resampling_keeps_a_tone_and_its_length() -> None:
    """44.1 kHz → 16 kHz: the same number of seconds, and the 220 Hz tone is still the loudest frequency."""
    out = resample(tone(2.0, rate=44_100), 44_100, RATE)
    assert len(out) == 2 * RATE
    spectrum = np.abs(np.fft.rfft(out))
    assert abs(np.argmax(spectrum) * RATE / len(out) - 220) < 2
    assert len(resample(tone(0.5, rate=8000), 8000, RATE)) == RATE // 2


def test_decoding_stops_at_the_limit_without_holding_the_bomb() -> None:
    """A bomb decodes block by block: its header gives no length, so it is refused while decoding, past the limit."""
    bomb = flac_bomb()
    frames = soundfile.info(io.BytesIO(bomb)).frames
    assert len(bomb) < 16 * 1024 and (frames <= 0 or frames > 2**62), (len(bomb), frames)
    with pytest.raises(InvalidInput) as info:
        decode_audio(bomb, max_bytes=10**8, max_seconds=60)
    assert info.value.code == "audio_too_long" and "decodes to more" in info.value.message
    # (libsndfile 1.2 fails at the end of such a FLAC within the limit: "Internal psf_fseek() failed", corrupt_audio.)
