"""Spoken questions end to end with the trained demo speech checkpoint (issue 28): held-out synthetic Mandarin
(rates and noise levels training never used) of the samples' questions, through the real gateway, the speech
worker and the picture worker. The SDK's transcriptions give the right text; a chat completion with a picture and
an ``input_audio`` part gives the picture's fact."""

from __future__ import annotations

import base64
import random
from collections.abc import Callable, Iterator

import pytest

from tuwen.pipeline.settings import Settings
from tests.gateway.conftest import Gateway, gateway_settings, start_gateway
from tests.gateway.test_openai import data_url, knows, sdk
from tuwen.workers.bench.process import WorkerProcess
from tuwen.workers.demo.samples import load_samples
from tuwen.workers.demo.speech import bundled_speech_model, synth
from tuwen.workers.demo.speech.evaluate import score
from tests.faults import report

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

#: Clip seeds of these tests (apart from training's and from the evaluation's splits).
SEED = 9_100_000


def held_out(text: str, seed: int) -> bytes:
    voice = synth.Voice.draw(random.Random(seed), synth.HELD_OUT)
    return synth.wav_bytes(synth.speak(text, seed=seed, voice=voice)[0])


@pytest.fixture(scope="module")
def trained(pipeline_settings: Settings, worker: WorkerProcess,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """A speech worker holding the shipped checkpoint, on a speech queue of its own, and a gateway over it."""
    settings = pipeline_settings.model_copy(update={"speech_queue": "it-speech-trained",
                                                    "speech_model_path": bundled_speech_model()})
    proc = WorkerProcess(settings, "trained-speech@tests", tmp_path_factory.mktemp("trained") / "w.log",
                         role="speech")
    proc.start()
    gw = None
    try:
        proc.wait_ready(timeout=180)
        gw = start_gateway(settings, gateway_settings())
        yield gw
    finally:
        if gw is not None:
            gw.stop()
        proc.stop()


def test_the_sdk_transcribes_held_out_spoken_questions(trained: Gateway, new_key: Callable[..., str]) -> None:
    client = sdk(trained, new_key())
    samples = load_samples()
    texts = [s.question for s in samples]
    heard = [client.audio.transcriptions.create(model="whisper-1", file=("q.wav", held_out(t, SEED + i), "audio/wav"))
             .text for i, t in enumerate(texts)]
    result = score(texts, heard)
    report("spoken questions transcribed through the SDK (held-out rates and noise)", **result)
    assert result["cer"] <= 0.05, (result, list(zip(texts, heard)))


def test_a_picture_and_a_spoken_question_give_the_pictures_fact(trained: Gateway,
                                                                 new_key: Callable[..., str]) -> None:
    client = sdk(trained, new_key())
    samples = load_samples()
    right = 0
    for i, sample in enumerate(samples):
        audio = base64.b64encode(held_out(sample.question, SEED + 100 + i)).decode()
        answer = client.chat.completions.create(model="tuwen", messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": data_url(sample.path.read_bytes())}},
            {"type": "input_audio", "input_audio": {"data": audio, "format": "wav"}}]}])
        right += knows(answer.choices[0].message.content or "", sample)
    report("a picture and a spoken question through chat completions", right=right, asked=len(samples))
    assert right >= 0.9 * len(samples), (right, len(samples))
