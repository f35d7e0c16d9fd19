"""Conversations in the runtime: turns, several pictures, the family's picture limit, long contexts.

The demo model answers from the pictures it is shown (known facts of the bundled samples); the tiny
llava and qwen2_vl checkpoints show that multi-turn, multi-picture rows answer the same batched as alone.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.workers.test_families import FAMILIES, items, picture
from tuwen.pipeline.settings import Settings
from tuwen.workers.runtime import Item, Runtime, bundled_demo_model

SAMPLES = bundled_demo_model().parent / "samples"


def sample(name: str) -> bytes:
    return (SAMPLES / name).read_bytes()


def fact(name: str) -> str:
    entry = next(s for s in json.loads((SAMPLES / "samples.json").read_text("utf-8")) if s["file"] == name)
    return str(entry["facts"][0])


def user(text: str, pictures: int = 0) -> dict[str, Any]:
    return {"role": "user", "content": [{"type": "image"}] * pictures + [{"type": "text", "text": text}]}


def assistant(text: str) -> dict[str, Any]:
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


@pytest.fixture(scope="module")
def demo() -> Runtime:
    rt = Runtime(Settings(torch_threads=1, max_new_tokens=48))
    rt.load()
    return rt


def test_a_follow_up_is_answered_from_the_first_turns_picture(demo: Runtime) -> None:
    blue = sample("colour-photo.png")
    follow_up = Item(messages=(user("看一看，这些图形是什么形状的？", 1), assistant("图中是一个图形。"),
                               user("图形是什么颜色的？")), images=(blue,))
    (answer,) = demo.answer_batch([follow_up])
    assert answer.ok and fact("colour-photo.png") in (answer.answer or ""), answer


def test_each_picture_of_a_job_is_seen(demo: Runtime) -> None:
    """Two pictures, the question about the last: the answer follows the picture that is asked about."""
    purple, blue = sample("colour-worksheet.png"), sample("colour-photo.png")
    q = "图形是什么颜色的？"
    first = Item(messages=(user("记住这张图。", 1), assistant("好的。"), user(q, 1)), images=(purple, blue))
    second = Item(messages=(user("记住这张图。", 1), assistant("好的。"), user(q, 1)), images=(blue, purple))
    a, b = demo.answer_batch([first, second])
    assert fact("colour-photo.png") in (a.answer or "") and fact("colour-worksheet.png") in (b.answer or ""), (a, b)


def test_more_pictures_than_the_family_takes_are_refused(demo: Runtime) -> None:
    img = sample("colour-photo.png")
    n = demo.max_images + 1
    too_many, fine = demo.answer_batch([Item(messages=(user("这些图形是什么颜色的？", n),), images=(img,) * n),
                                        Item(img, "图形是什么颜色的？")])
    assert too_many.error is not None and too_many.error["code"] == "too_many_images"
    assert str(n) in too_many.error["message"] and too_many.answer is None
    assert fine.ok


def long_chat(turns: int) -> tuple[dict[str, Any], ...]:
    history: list[dict[str, Any]] = [{"role": "system", "content": [{"type": "text", "text": "你是一位数学老师。"}]},
                                     user("看这张图。" + "请仔细看。" * 20, 1), assistant("好的。" * 10)]
    for k in range(turns):
        history += [user(f"第{k}个问题：" + "这是一段很长的话。" * 12), assistant("明白。" * 10)]
    return (*history, user("图形是什么颜色的？", 1))


def test_a_conversation_longer_than_the_context_is_refused_with_counts(demo: Runtime) -> None:
    img = sample("colour-photo.png")
    (answer,) = demo.answer_batch([Item(messages=long_chat(8), images=(img, img))])
    assert answer.error is not None and answer.error["code"] == "context_too_long", answer
    assert str(demo.context_length) in answer.error["message"] and "48" in answer.error["message"]


def test_oldest_turns_truncation_keeps_system_and_last_turn(demo: Runtime) -> None:
    purple, blue = sample("colour-worksheet.png"), sample("colour-photo.png")
    (answer,) = demo.answer_batch([Item(messages=long_chat(8), images=(purple, blue), truncation="oldest_turns")])
    assert answer.ok, answer.error
    assert fact("colour-photo.png") in (answer.answer or ""), "the last turn's picture must survive"
    assert answer.prompt_tokens + 48 <= demo.context_length


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_multi_turn_multi_picture_batched_equals_alone(family: str, tmp_path: Path) -> None:
    spec = next(f for f in FAMILIES if f.name == family)
    spec.build(tmp_path)
    rt = Runtime(Settings(model_path=tmp_path, torch_threads=1, max_new_tokens=8))
    rt.load()
    pics = [picture(40 + 13 * i, 32 + 7 * i, seed=i) for i in range(4)]
    jobs = [
        Item(messages=(user("比较这两张图。", 2), assistant("第一张更大。"), user("第二张呢？")), images=(pics[0], pics[1]),
             max_new_tokens=8),
        Item(messages=(user("看图。", 1), assistant("好。"), user("再看这张。", 1)), images=(pics[2], pics[3]),
             max_new_tokens=8),
        *items(8)[:2],
    ]
    batched = rt.answer_batch(jobs)
    alone = [rt.answer_batch([job])[0] for job in jobs]
    assert all(a.ok for a in batched), [a.error for a in batched]
    assert [a.tokens for a in batched] == [a.tokens for a in alone]
    assert batched[0].prompt_tokens > batched[2].prompt_tokens, "two pictures must cost more prompt tokens"
