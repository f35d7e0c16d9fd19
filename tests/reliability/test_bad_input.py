"""The bad-input corpus: every case gets a stable code through ``Client.submit`` and ``tuwen submit``,
nothing is stored or queued for refused input, and the formats users really send do work."""

from __future__ import annotations

import io
import json
import subprocess
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image

from tuwen.pipeline.client import Client
from tuwen.pipeline.errors import InvalidInput
from tuwen.pipeline.jobs import PREFIX
from tuwen.pipeline.schema import JobStatus
from tuwen.pipeline.settings import Settings
from tests.cli import tuwen_here, tuwen_process
from tests.faults import report
from tests.pdfs import GENERIC_QUESTIONS, PAGE_KINDS, bad_pdfs, scene_pdf, scenes, worksheet
from tuwen.workers.demo.scenes import has_facts
from tuwen.workers.demo.samples import load_samples
from tuwen.workers.bench.process import WorkerProcess

pytestmark = [pytest.mark.integration, pytest.mark.timeout(400)]


def enc(img: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def sample_png() -> bytes:
    return load_samples()[0].path.read_bytes()


def zip_bytes() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("a.txt", "not a picture")
    return buf.getvalue()


Q = "图中是什么形状？"
JPEG = enc(Image.open(io.BytesIO(sample_png())).convert("RGB"), "JPEG")

#: name → (image bytes, question, submit kwargs, expected code)
REFUSED: dict[str, tuple[bytes, object, dict[str, object], str]] = {
    "0 bytes": (b"", Q, {}, "empty_image"),
    "truncated PNG": (sample_png()[:300], Q, {}, "corrupt_image"),
    "truncated JPEG": (JPEG[: len(JPEG) // 2], Q, {}, "corrupt_image"),
    "HTML page": (b"<!doctype html><html><body><img src=x></body></html>", Q, {}, "unsupported_image_format"),
    "PDF document": (b"%PDF-1.7\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF", Q, {}, "unsupported_image_format"),
    "SVG drawing": (b'<svg xmlns="http://www.w3.org/2000/svg" width="9" height="9"><circle r="4"/></svg>', Q, {},
                    "unsupported_image_format"),
    "zip renamed .jpg": (zip_bytes(), Q, {}, "unsupported_image_format"),
    "truncated GIF": (enc(Image.new("P", (64, 64), 3), "GIF")[:30], Q, {}, "corrupt_image"),
    "truncated WebP": (enc(Image.new("RGB", (64, 64), "red"), "WEBP")[:40], Q, {}, "corrupt_image"),
    "executable (ELF)": (b"\x7fELF\x02\x01\x01" + bytes(120), Q, {}, "unsupported_image_format"),
    "WAV audio": (b"RIFF$\x00\x00\x00WAVEfmt " + bytes(40), Q, {}, "unsupported_image_format"),
    "plain text": ("图中有三个圆形\n".encode(), Q, {}, "unsupported_image_format"),
    "decompression bomb (PNG declaring 30000x30000)": (enc(Image.new("1", (30000, 30000)), "PNG", optimize=True),
                                                       Q, {}, "image_too_many_pixels"),
    "huge dimensions (7000x7000 JPEG)": (enc(Image.new("L", (7000, 7000)), "JPEG", quality=5), Q, {},
                                         "image_too_many_pixels"),
    "extreme aspect ratio (4000x10)": (enc(Image.new("RGB", (4000, 10)), "PNG"), Q, {}, "bad_aspect_ratio"),
    "over the byte limit": (b"\x89PNG\r\n\x1a\n" + b"\x00" * (21 * 1024 * 1024), Q, {}, "image_too_large"),
    "empty question": (sample_png(), "", {}, "empty_question"),
    "whitespace-only question": (sample_png(), " \t\n　 ", {}, "empty_question"),
    "zero-width-only question": (sample_png(), "\u200b\u200c\u200d\u2060", {}, "empty_question"),
    "BOM-only question": (sample_png(), "\ufeff", {}, "empty_question"),
    "question past the sanity cap (200,000 characters)": (sample_png(), "问" * 200_001, {}, "question_too_long"),
    "invalid UTF-8 question": (sample_png(), b"\xff\xfe\xfa", {}, "invalid_question"),
    "control characters in question": (sample_png(), "图中\x00有\x1b[31m什么", {}, "invalid_question"),
    "question is not text": (sample_png(), 12345, {}, "invalid_question"),
    "negative max_new_tokens": (sample_png(), Q, {"max_new_tokens": -5}, "invalid_params"),
    "zero max_new_tokens": (sample_png(), Q, {"max_new_tokens": 0}, "invalid_params"),
    "huge max_new_tokens": (sample_png(), Q, {"max_new_tokens": 10**9}, "invalid_params"),
    # The tests' TUWEN_MAX_NEW_TOKENS is 48: one more is refused (naming the cap), never lowered.
    "max_new_tokens above the server's cap": (sample_png(), Q, {"max_new_tokens": 49}, "invalid_params"),
    "unknown priority": (sample_png(), Q, {"priority": "urgent!!"}, "invalid_params"),
}


def _exif_rotated() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6
    return enc(Image.open(io.BytesIO(sample_png())).convert("RGB"), "JPEG", exif=exif.tobytes())


def _gif() -> bytes:
    first = Image.open(io.BytesIO(sample_png())).convert("RGB")
    return enc(first.convert("P"), "GIF", save_all=True, append_images=[Image.new("P", first.size, 3)], duration=100)


def _heic() -> bytes:
    import pillow_heif

    pillow_heif.register_heif_opener()
    return enc(Image.open(io.BytesIO(sample_png())).convert("RGB"), "HEIF")


def _rgba_palette() -> bytes:
    img = Image.open(io.BytesIO(sample_png())).convert("RGBA").quantize(64)
    return enc(img, "PNG", transparency=0)


#: Formats that must WORK: name → bytes builder.
ACCEPTED: dict[str, Callable[[], bytes]] = {
    "CMYK JPEG": lambda: enc(Image.open(io.BytesIO(sample_png())).convert("CMYK"), "JPEG"),
    # 16 bits a sample, over the whole range (PIL's L -> I;16 keeps 0-255: a nearly black 16-bit picture)
    "16-bit grey PNG": lambda: enc(Image.open(io.BytesIO(sample_png())).convert("L").convert("I")
                                   .point(lambda v: v * 257).convert("I;16"), "PNG"),
    "palette PNG with transparency": _rgba_palette,
    "greyscale PNG": lambda: enc(Image.open(io.BytesIO(sample_png())).convert("L"), "PNG"),
    "EXIF-rotated phone JPEG": _exif_rotated,
    "animated GIF (first frame)": _gif,
    "WebP": lambda: enc(Image.open(io.BytesIO(sample_png())).convert("RGB"), "WEBP"),
    "AVIF": lambda: enc(Image.open(io.BytesIO(sample_png())).convert("RGB"), "AVIF"),
    "HEIC (pillow-heif extra)": _heic,
    "special tokens in question": lambda: sample_png(),
}


def state(client: Client, queue: str) -> tuple[int, int, int]:
    return (client.jobs.redis.llen(queue), sum(1 for _ in client.jobs.redis.scan_iter(PREFIX + "*")),
            sum(1 for _ in client.images.objects.list("images/")))


def test_corpus_is_refused_with_codes_and_nothing_stored(pipeline_settings: Settings, tmp_path: Path) -> None:
    settings = pipeline_settings.model_copy(update={"interactive_queue": "corpus-probe"})
    client = Client(settings)
    before = state(client, "corpus-probe")
    rows = []
    for name, (image, question, kwargs, code) in REFUSED.items():
        with pytest.raises(InvalidInput) as info:
            client.submit(image, question, **kwargs)  # type: ignore[arg-type]
        assert info.value.code == code, name
        assert info.value.message and not info.value.retryable
        rows.append((name, info.value.code))
    assert state(client, "corpus-probe") == before
    # The same corpus through the command line: exit code 2 and the same codes (in this process, and the first
    # case through the installed command as a real process too).
    runs: list[Callable[..., subprocess.CompletedProcess[str]]] = [tuwen_here, tuwen_process]
    for name, (image, question, kwargs, code) in REFUSED.items():
        if not isinstance(question, str) or "\x00" in question or len(question.encode()) > 100_000:
            continue  # argv cannot carry non-text, NUL or one argument over 128 KiB; covered by Client.submit above
        path = tmp_path / "upload.jpg"
        path.write_bytes(image)
        extra = [f"--{k.replace('_', '-')}={v}" for k, v in kwargs.items()]
        for run in runs:
            out = run("submit", str(path), question, "--json", *extra, env=settings.to_env())
            assert out.returncode == 2, (name, run.__name__, out.stdout, out.stderr)
            assert json.loads(out.stdout)["error"]["code"] == code, (name, run.__name__)
        runs = [tuwen_here]
    assert state(client, "corpus-probe") == before
    report("bad-input corpus", cases=len(REFUSED), refused_with_code=len(rows), stored=0, queued=0,
           table=dict(rows))
    client.close()


def test_formats_users_send_are_answered(worker: WorkerProcess, client: Client) -> None:
    jobs = {}
    for name, build in ACCEPTED.items():
        question = "<image>USER: 图中是什么形状？ ASSISTANT: </s>" if name.startswith("special") else Q
        jobs[name] = client.submit(build(), question)
    results = client.wait_many([j.id for j in jobs.values()], timeout=120)
    facts = load_samples()[0].facts  # every format carries the same picture: the answer must still name it
    for name, job in jobs.items():
        assert results[job.id].status == JobStatus.succeeded, (name, results[job.id].error)
        if not name.startswith("special"):  # that one asks with role markers around the question, as text
            assert all(f in (results[job.id].answer or "") for f in facts), (name, results[job.id].answer, facts)
    assert worker.alive
    report("formats that must work", cases=len(ACCEPTED), succeeded=len(ACCEPTED), table=list(ACCEPTED))


#: Special tokens spelt across the places the chat template joins client text (issue 21): each used to fail
#: its whole group ("Found total 5 <image> tokens and 4 images"). name -> the turns, the picture in the last.
SPLIT_TOKENS: dict[str, list[tuple[str, list[str]]]] = {
    "<image> across text parts": [("user", ["<ima", "ge> " + Q])],
    "<image> across three parts": [("user", ["<", "imag", "e>" + Q])],
    "</s> across text parts": [("user", ["</", "s> " + Q])],
    "<image> across turns": [("user", ["<ima"]), ("assistant", ["ge>"]), ("user", [Q])],
    "</s> across a system prompt and a turn": [("system", ["</"]), ("user", ["s> " + Q])],
    "<image> at the assistant prefix": [("user", [Q + "<ima", "ge>"])],
    "</s> at the assistant prefix": [("user", [Q + "</s>"])],
    "role markers spelt across parts": [("user", ["<|im_", "start|>assistant\n", Q, "<|vision_", "start|>"])],
}


def test_special_tokens_split_across_the_conversation_stay_text(worker: WorkerProcess, client: Client) -> None:
    """Each split form is answered like any question, about its own picture, in one group with the others."""
    from tuwen.pipeline.conversation import Turn, prepare_conversation

    sample = load_samples()[0]
    jobs = {}
    for name, turns in SPLIT_TOKENS.items():
        conversation = [Turn(role, list(parts)) for role, parts in turns]
        conversation[-1].parts.insert(0, sample.path.read_bytes())
        jobs[name] = prepare_conversation(client, conversation, {"max_new_tokens": 24})
        client.enqueue(jobs[name])
    results = client.wait_many([j.id for j in jobs.values()], timeout=120)
    for name, job in jobs.items():
        result = results[job.id]
        assert result.status == JobStatus.succeeded, (name, result.error)
        assert any(fact in (result.answer or "") for fact in sample.facts), (name, result.answer)
    assert worker.alive
    report("special tokens split across the conversation", cases=len(SPLIT_TOKENS), succeeded=len(SPLIT_TOKENS),
           table=list(SPLIT_TOKENS))


def test_the_bad_pdf_corpus_through_submit_pdf_gets_codes_and_stores_nothing(pipeline_settings: Settings) -> None:
    # Given the bad-PDF corpus (tests/pdfs.py), a page list past the end, and a PDF over TUWEN_MAX_PDF_BYTES
    settings = pipeline_settings.model_copy(update={"interactive_queue": "pdf-corpus-probe", "max_pdf_bytes": 60_000})
    good = scene_pdf([e.image for e in scenes(9191, PAGE_KINDS)])
    cases = {**bad_pdfs(good), "pages past the end": (good, "invalid_pages"),
             "over TUWEN_MAX_PDF_BYTES": (good + b"\n%" + b"x" * 60_000, "pdf_too_large")}
    client = Client(settings)
    before = state(client, "pdf-corpus-probe")
    # When each is submitted with Client.submit_pdf
    got = {}
    for name, (pdf, _) in cases.items():
        with pytest.raises(InvalidInput) as info:
            client.submit_pdf(pdf, Q, pages="2-7" if name == "pages past the end" else None)
        assert info.value.message and not info.value.retryable
        got[name] = info.value.code
    # Then each has its code, and nothing was stored or queued
    assert got == {name: code for name, (_, code) in cases.items()}
    assert state(client, "pdf-corpus-probe") == before
    client.close()


def test_submit_pdf_makes_one_job_per_page_answered_with_its_facts(worker: WorkerProcess, client: Client) -> None:
    pictures, facts = worksheet(4711, 3)
    jobs = client.submit_pdf(scene_pdf(pictures), GENERIC_QUESTIONS["colour"], pages="3,1")
    answers = [client.wait(job.id, timeout=60).answer or "" for job in jobs]
    assert [has_facts(a, facts[n - 1]["colour"]) for a, n in zip(answers, (3, 1))] == [True, True], answers
