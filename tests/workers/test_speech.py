"""The speech stage (issue 28, parts 2 and 3): a real speech worker and a real picture worker on the session's
Redis and S3. With the untrained speech model these check the plumbing (one id through both stages, the stages
and their timings, coded failures naming their stage, batching identity); the answers' facts wait for the
trained checkpoint."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile

from tuwen.pipeline.client import Client
from tuwen.pipeline.registry import live_workers
from tuwen.pipeline.schema import AudioPart, ImagePart, JobRequest, JobStatus, Message, Role, StageName, TextPart
from tuwen.pipeline.settings import Settings
from tuwen.workers.bench.process import WorkerProcess
from tuwen.workers.demo.samples import load_samples

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

RATE = 16_000


def spoken(seed: int = 0, text: str | None = None) -> bytes:
    """A spoken question as WAV bytes: the demo synthesiser's Mandarin (espeak-ng) of ``text``, by default the
    question of the sample ``seed`` picks, in a voice drawn from ``seed``."""
    from tuwen.workers.demo.speech.synth import speak, wav_bytes

    samples = load_samples()
    return wav_bytes(*speak(text or samples[seed % len(samples)].question, seed=seed))


def seconds(audio: bytes) -> float:
    return float(soundfile.info(io.BytesIO(audio)).duration)


def test_batched_transcripts_equal_transcripts_made_alone(untrained_speech: Path) -> None:
    """Given clips of different lengths (one longer than the model's window), when they are transcribed as one batch
    and one at a time, then the transcripts are the same, token for token (fp32, greedy)."""
    from tuwen.workers.engine.speech import SpeechRuntime

    runtime = SpeechRuntime(Settings(speech_model_path=untrained_speech, torch_threads=1, speech_max_new_tokens=24))
    runtime.load()
    clips = [soundfile.read(io.BytesIO(spoken(seed=i)), dtype="float32")[0] for i in range(2)]
    clips.append(np.concatenate([*clips, *clips, *clips]))  # longer than the demo model's 8 s window
    assert len(clips[2]) > 8 * RATE
    together = runtime.transcribe(clips)
    alone = [runtime.transcribe([clip])[0] for clip in clips]
    assert together == alone
    assert all(t.tokens > 0 for t in together)
    assert together[2].tokens > together[0].tokens  # the long clip is two windows of the 8 s model


def test_a_spoken_question_goes_through_both_stages_under_one_id(speech_worker: WorkerProcess, worker: WorkerProcess,
                                                                 client: Client) -> None:
    """Given a speech worker and a picture worker, when a picture is asked about aloud, then the one job id ends
    succeeded with its transcript, both stages with their timings, and an answer from the picture model."""
    sample = load_samples()[0]
    audio = spoken(text=sample.question)
    job = client.submit(sample.path, audio=audio)
    assert client.get(job.id).stage == StageName.speech
    result = client.wait(job.id, timeout=120)
    assert result.status == JobStatus.succeeded, result.error
    assert result.transcript and result.answer is not None
    assert [s.name for s in result.stages or []] == [StageName.speech, StageName.picture]
    speech, picture = result.stages or []
    assert speech.model_id and picture.model_id == result.model_id and speech.model_id != result.model_id
    assert speech.timings["speech_model_ms"] > 0 and speech.timings["audio_ms"] == pytest.approx(seconds(audio) * 1000,
                                                                                                  abs=1)
    assert picture.timings["picture_ms"] > 0 and (speech.finished_at or 0) <= (picture.started_at or 0)
    assert result.timings["total_ms"] >= speech.timings["speech_ms"] + picture.timings["picture_ms"] - 1
    assert {"speech_ms", "speech_model_ms", "queue_ms", "fetch_ms", "total_ms"} <= set(result.timings), result.timings
    # And a transcription alone ends in the speech stage, the transcript its answer.
    request = client.transcription(spoken(seed=3))
    client.enqueue(request)
    alone = client.wait(request.id, timeout=120)
    assert alone.status == JobStatus.succeeded and alone.answer == alone.transcript and alone.transcript
    assert alone.stage == StageName.speech and [s.name for s in alone.stages or []] == [StageName.speech]


def test_a_failure_in_either_stage_names_the_stage(speech_worker: WorkerProcess, worker: WorkerProcess,
                                                  client: Client, pipeline_settings: Settings) -> None:
    """Given jobs whose audio (first) or picture (second) has gone from storage, when they run, then each fails
    with a code and the stage that failed; the second after its speech stage succeeded."""
    sample = load_samples()[0]
    picture = client.store_image(sample.path)
    audio = client.put_audio(client.check_audio(spoken(seed=5)))
    gone = "images/" + "0" * 64
    no_audio = JobRequest(messages=(Message(role=Role.user, content=(ImagePart(key=picture), AudioPart(key=gone))),))
    no_picture = JobRequest(messages=(Message(role=Role.user, content=(
        ImagePart(key=gone), TextPart(text="问："), AudioPart(key=audio))),))
    for request in (no_audio, no_picture):
        client.enqueue(request)
    results = client.wait_many([no_audio.id, no_picture.id], timeout=120)
    first, second = results[no_audio.id], results[no_picture.id]
    assert first.status == JobStatus.failed and first.error is not None
    assert (first.error.code, first.error.stage) == ("audio_not_found", StageName.speech)
    assert second.status == JobStatus.failed and second.error is not None
    assert (second.error.code, second.error.stage) == ("image_not_found", StageName.picture)
    assert second.transcript and [s.name for s in second.stages or []] == [StageName.speech, StageName.picture]
    assert {w["name"] for w in live_workers(client.jobs.redis)} >= {speech_worker.hostname, worker.hostname}


def test_tuwen_submit_takes_a_spoken_question(speech_worker: WorkerProcess, worker: WorkerProcess,
                                              pipeline_settings: Settings, tmp_path: Path) -> None:
    """``tuwen submit page.png --audio q.wav --wait --json``: the job's JSON with its transcript and both stages."""
    from tests.cli import tuwen_here

    sample = load_samples()[3]
    (tmp_path / "q.wav").write_bytes(spoken(seed=41, text=sample.question))
    out = tuwen_here("submit", str(sample.path), "--audio", str(tmp_path / "q.wav"), "--wait", "--json",
                     env=pipeline_settings.to_env())
    assert out.returncode == 0, out.stderr
    job = json.loads(out.stdout)
    assert job["status"] == "succeeded" and job["transcript"] and [s["name"] for s in job["stages"]] == [
        "speech", "picture"]
