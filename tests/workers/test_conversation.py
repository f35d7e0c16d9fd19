"""Conversations in the runtime: turns, several pictures, the family's picture limit, long contexts.

The demo model answers from the pictures it is shown (known facts of the bundled samples); the tiny
llava and qwen2_vl checkpoints show that multi-turn, multi-picture rows answer the same batched as alone.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.workers.test_families import items, picture
from tuwen.pipeline.settings import Settings
from tuwen.workers.demo import bundled_demo_model
from tuwen.workers.engine.model import Item, Runtime
from tuwen.workers.engine.prompts import Prompts

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
    rt = Runtime(Settings(model_path=bundled_demo_model(), torch_threads=1, max_new_tokens=48))
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
    (answer,) = demo.answer_batch([Item(messages=long_chat(8), images=(img, img), max_new_tokens=48)])
    assert answer.error is not None and answer.error["code"] == "context_too_long", answer
    assert str(demo.context_length) in answer.error["message"] and "48" in answer.error["message"]


def test_oldest_turns_truncation_keeps_system_and_last_turn(demo: Runtime) -> None:
    purple, blue = sample("colour-worksheet.png"), sample("colour-photo.png")
    (answer,) = demo.answer_batch([Item(messages=long_chat(8), images=(purple, blue), truncation="oldest_turns",
                                        max_new_tokens=48)])
    assert answer.ok, answer.error
    assert fact("colour-photo.png") in (answer.answer or ""), "the last turn's picture must survive"
    assert answer.prompt_tokens + 48 <= demo.context_length


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_multi_turn_multi_picture_batched_equals_alone(family: str,
                                                       tiny_checkpoint: Callable[[str], Path]) -> None:
    rt = Runtime(Settings(model_path=tiny_checkpoint(family), torch_threads=1, max_new_tokens=8))
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


def test_an_answer_with_no_max_tokens_gets_the_rest_of_the_context_up_to_the_cap(demo: Runtime) -> None:
    """Issue 22: no budget means what is left of the context (a forced-length answer runs to it), never a
    silent 64; a budget above the worker's cap is refused, naming it, not lowered."""
    img = sample("colour-photo.png")
    demo.min_new_tokens = 10_000  # the benchmark hook: no end of sequence, so the budget is what ends it
    try:
        (whole,) = demo.answer_batch([Item(img, "图形是什么颜色的？")])
    finally:
        demo.min_new_tokens = 0
    cap = demo.settings.max_new_tokens
    assert whole.finish_reason == "length"
    assert whole.generated_tokens == min(cap, demo.context_length - whole.prompt_tokens)
    (over,) = demo.answer_batch([Item(img, "图形是什么颜色的？", max_new_tokens=cap + 1)])
    assert over.error is not None and over.error["code"] == "invalid_params" and str(cap) in over.error["message"]


def test_the_last_assistant_message_is_continued_and_system_messages_stand_anywhere(demo: Runtime) -> None:
    img = sample("colour-photo.png")
    colour = fact("colour-photo.png")
    ask = user("图形是什么颜色的？", 1)
    shapes = {
        "prefill": Item(messages=(ask, assistant("图形是")), images=(img,), continue_final=True),
        "system after the first turn": Item(messages=(ask, assistant(f"图形是{colour}的。"),
                                                      {"role": "system", "content": "请简短回答。"},
                                                      user("再说一遍，图形是什么颜色的？")), images=(img,)),
        "a picture with no text": Item(messages=({"role": "user", "content": [{"type": "image"}]},), images=(img,)),
    }
    batched = demo.answer_batch(list(shapes.values()))
    alone = [demo.answer_batch([item])[0] for item in shapes.values()]
    assert all(a.ok for a in batched), [a.error for a in batched]
    assert [a.tokens for a in batched] == [a.tokens for a in alone]
    prefill, again, _ = batched
    assert colour in (prefill.answer or "") and not (prefill.answer or "").startswith("图形是"), prefill.answer
    assert colour in (again.answer or ""), again.answer


def test_sampling_knobs_reach_each_row(demo: Runtime) -> None:
    """Each row gets its own knobs, batched or alone: top-k 1 and min-p 1 keep only the likeliest token, so
    sampling with them at temperature 1 gives the greedy answer; penalties change the logits they should."""
    import torch

    from tuwen.workers.engine.batch import Sampling, _Live, _penalize

    img = sample("colour-photo.png")
    knobs = [Sampling(), Sampling(temperature=1.0, top_k=1, seed=7), Sampling(temperature=1.0, min_p=1.0, seed=8),
             Sampling(temperature=1.0, seed=9), Sampling(repetition_penalty=1.3, frequency_penalty=0.5)]
    items = [Item(img, "描述这张图片。", 24, sampling=s) for s in knobs]
    batched = demo.answer_batch(items)
    alone = [demo.answer_batch([item])[0] for item in items]
    assert [a.tokens for a in batched] == [a.tokens for a in alone]
    greedy = batched[0].tokens
    assert batched[1].tokens == greedy and batched[2].tokens == greedy
    # The penalties, on known logits: token 1 was in the prompt, token 2 generated twice.
    row = Item(img, "?", 4, sampling=Sampling(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=1.0))
    live = _Live(demo._row(demo._prepare(0, row))[0], 3, demo.processor.tokenizer, 0.0, prompt_ids=[1])
    live.tokens = [2, 2]
    logits = torch.tensor([1.0, 4.0, -2.0, 3.0])
    _penalize(logits, live)
    assert logits.tolist() == [1.0, 2.0, -4.0 - 0.5 * 2 - 1.0, 3.0]


def test_whether_a_template_renders_tools_is_found_by_rendering(demo: Runtime) -> None:
    """What the worker announces as ``renders_tools`` (the gateway refuses ``tool_choice: "auto"`` without it):
    the demo template shows no tools; the same processor with a template that lists them does; one that fails
    on them does not."""
    assert demo.renders_tools is False
    listing, failing = copy.copy(demo.processor), copy.copy(demo.processor)
    listing.chat_template = ("{% for t in tools or [] %}{{ t.function.name }}\n{% endfor %}"
                             "{% for m in messages %}{{ m.role }}: {{ m.content[0].text }}\n{% endfor %}")
    failing.chat_template = "{{ raise_exception('no tools here') if tools else '' }}{{ messages[0].role }}"
    assert Prompts(listing).renders_tools is True and Prompts(failing).renders_tools is False
