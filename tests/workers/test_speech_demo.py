"""The demo speech model: synthetic Mandarin from espeak-ng, a tiny Whisper that the generic Hugging Face
path loads with no code of ours, its trainer, and the shipped checkpoint's character error rate on held-out
speech (rates and noise levels training never used)."""

from __future__ import annotations

import io
import json
import wave
from pathlib import Path

import numpy as np
import pytest

from tuwen.workers.demo.speech import bundled_speech_model, corpus, synth

pytestmark = pytest.mark.timeout(300)


# -- synthetic speech ----------------------------------------------------------------------------------------
def test_speak_is_mono_float32_at_16_khz_and_reproducible_from_its_seed() -> None:
    audio, rate = synth.speak("八减二等于几？", seed=11)
    again, _ = synth.speak("八减二等于几？", seed=11)
    other, _ = synth.speak("八减二等于几？", seed=12)
    assert rate == 16_000 and audio.dtype == np.float32 and audio.ndim == 1
    assert 0.5 < len(audio) / rate < 8 and 0.001 < np.abs(audio).max() <= 1.0
    assert np.array_equal(audio, again)
    assert len(other) != len(audio) or not np.allclose(other, audio)


def test_a_written_wav_reads_back_as_the_same_samples(tmp_path: Path) -> None:
    audio, rate = synth.speak("图中是什么形状？", seed=3)
    path = synth.write_wav(tmp_path / "q.wav", audio, rate)
    with wave.open(str(path)) as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate()) == (1, 2, 16_000)
        pcm = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").astype(np.float32) / 32767
    assert np.abs(pcm - audio).max() < 1e-4
    assert path.read_bytes() == synth.wav_bytes(audio, rate)
    assert wave.open(io.BytesIO(synth.wav_bytes(audio))).getnframes() == len(audio)


def test_held_out_rates_and_noise_levels_are_never_trained_on() -> None:
    def covered(ranges: tuple, value: float) -> bool:
        return any(r is not None and r[0] <= value <= r[1] for r in ranges)

    for low, high in synth.HELD_OUT.rates:
        assert not any(covered(synth.TRAIN.rates, v) for v in range(low, high + 1))
    for snr in synth.HELD_OUT.snrs:
        assert snr is not None and not covered(synth.TRAIN.snrs, snr[0]) and not covered(synth.TRAIN.snrs, snr[1])
        assert not any(lo <= snr[0] <= hi or snr[0] <= lo <= snr[1] for lo, hi in filter(None, synth.TRAIN.snrs))
    assert not set(synth.UNSEEN_VARIANTS) & set(synth.VARIANTS)
    assert not set(corpus.sentences("held_out")) & set(corpus.sentences("train"))
    assert set(corpus.demo_questions()) <= set(corpus.sentences("train"))


# -- the untrained checkpoint --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def untrained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tuwen.workers.demo.speech.build import build_untrained

    return build_untrained(tmp_path_factory.mktemp("speech") / "untrained")


def test_the_generic_loaders_read_it_as_whisper_with_no_hub(untrained: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForSpeechSeq2Seq, AutoProcessor

    processor = AutoProcessor.from_pretrained(untrained)
    model = AutoModelForSpeechSeq2Seq.from_pretrained(untrained)
    assert type(processor).__name__ == "WhisperProcessor"
    assert type(processor.tokenizer).__name__ == "WhisperTokenizer"
    assert type(processor.feature_extractor).__name__ == "WhisperFeatureExtractor"
    assert type(model).__name__ == "WhisperForConditionalGeneration"
    audio, rate = synth.speak("这是什么颜色？", seed=5)
    features = processor([audio, audio[: rate]], sampling_rate=rate, return_tensors="pt").input_features
    ids = model.generate(input_features=features, max_new_tokens=4)  # random weights: a few tokens will do
    texts = processor.batch_decode(ids, skip_special_tokens=True)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)
    assert model.generate(input_features=features, language="zh", task="transcribe", max_new_tokens=4).shape[0] == 2


def test_the_tokenizer_spells_every_sentence_one_token_a_character_behind_whispers_prefix(untrained: Path) -> None:
    from transformers import AutoProcessor

    tok = AutoProcessor.from_pretrained(untrained).tokenizer
    prefix = tok.convert_tokens_to_ids(["<|startoftranscript|>", "<|zh|>", "<|transcribe|>", "<|notimestamps|>"])
    for text in corpus.sentences("train") + corpus.sentences("held_out"):
        ids = tok(text).input_ids
        assert ids[:4] == prefix and ids[-1] == tok.eos_token_id and len(ids) == len(text) + 5, text
        assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok.decode(tok("你好 hello").input_ids, skip_special_tokens=True) == "你好 hello"  # bytes for the rest


def test_training_runs_and_saves_a_plain_whisper_checkpoint(tmp_path: Path) -> None:
    from transformers import AutoConfig

    from tuwen.workers.demo.speech.train import train

    out = train(tmp_path / "ck", steps=2, batch_size=4, pool_size=6, eval_every=100, eval_clips=2,
                log=lambda _: None)
    assert AutoConfig.from_pretrained(out).model_type == "whisper"
    log = json.loads((out / "training_log.json").read_text())
    assert log[-1]["step"] == 2 and "questions cer" in log[-1]


# -- the shipped checkpoint ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def shipped():  # -> (model, processor)
    import torch

    from tuwen.workers.demo.speech.evaluate import load

    torch.set_num_threads(1)
    return load(bundled_speech_model())


def test_the_shipped_checkpoint_is_small_and_plain() -> None:
    files = {p.name: p.stat().st_size for p in bundled_speech_model().iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= set(files)
    assert sum(files.values()) < 10_000_000, files


def test_batched_transcripts_equal_transcripts_made_alone(shipped) -> None:
    """fp32, greedy: a padded batch of clips of different lengths (and a silence) gives each clip the
    transcript it gets alone."""
    from tuwen.workers.demo.speech.evaluate import held_out_clips, transcribe

    model, processor = shipped
    audios = [a for _, a in held_out_clips("questions", 5, split="dev")]
    audios += [a for _, a in held_out_clips("sums and counts", 2, split="dev")] + [np.zeros(8000, np.float32)]
    alone = [transcribe(model, processor, [a])[0] for a in audios]
    assert transcribe(model, processor, audios, batch_size=len(audios)) == alone
    assert len({len(t) for t in alone}) > 2  # transcripts of different lengths: the batch really pads


def test_the_speech_worker_runtime_gives_a_clip_the_same_transcript_batched_or_alone() -> None:
    """The worker's own path (``SpeechRuntime``) with the shipped checkpoint: text, token count and finish reason
    are the same in a batch and alone (a lone row's end-of-text, which generate drops, read as 'length')."""
    from tuwen.pipeline.settings import Settings
    from tuwen.workers.demo.speech.evaluate import held_out_clips
    from tuwen.workers.engine.speech import SpeechRuntime

    runtime = SpeechRuntime(Settings(speech_model_path=bundled_speech_model(), torch_threads=1))
    runtime.load()
    clips = [a for _, a in held_out_clips("questions", 4, split="dev")]
    together = runtime.transcribe(clips)
    assert together == [runtime.transcribe([c])[0] for c in clips]
    assert {t.finish_reason for t in together} == {"stop"} and all(t.text for t in together)
