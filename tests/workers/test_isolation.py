"""One bad job fails alone: client text never becomes a special token, wherever it is split, and a job
that breaks the processor or the model is found by splitting its group, while its neighbours are answered
token for token as they are alone (issue 21)."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from tests.workers.test_scheduler import rt, samples  # noqa: F401 - the demo runtime and samples, as fixtures
from tuwen.pipeline.errors import ErrorCode
from tuwen.workers.engine.batch import Engine
from tuwen.workers.engine.core import Scheduler
from tuwen.workers.engine.model import Answer, Item, Runtime
from tuwen.workers.engine.prompts import JOINER, Prompts
from tuwen.workers.serve.hooks import injected_row_failure


def turn(*texts: str, image: bool = True, role: str = "user") -> dict[str, Any]:
    parts: list[dict[str, Any]] = [{"type": "image"}] if image else []
    return {"role": role, "content": parts + [{"type": "text", "text": t} for t in texts]}


def split_forms(token: str, question: str) -> dict[str, list[dict[str, Any]]]:
    """``token`` spelt across the places a template joins client text (each conversation has one picture,
    in its last user turn)."""
    a, b = token[: len(token) // 2], token[len(token) // 2:]
    return {
        "across parts": [turn(a, b + question)],
        "across parts, three pieces": [turn(token[:1], token[1:-1], token[-1:] + question)],
        "across messages": [turn(a, image=False), turn(b, image=False, role="assistant"), turn(question)],
        "across a system prompt and a turn": [{"role": "system", "content": a}, turn(b + question)],
        "at the assistant prefix": [turn(question + a)],
        "whole, in one part": [turn(token + question)],
        "whole, at the end": [turn(question, token)],
    }


def family_tokens(prompts: Prompts) -> list[str]:
    """The tokens an attacker would want: picture, end-of-sequence, padding and every role marker."""
    proc, tok = prompts.processor, prompts.tokenizer
    wanted = {getattr(proc, "image_token", None), tok.eos_token, tok.pad_token, tok.bos_token, "<image>", "</s>",
              "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|image_pad|>", "<|vision_end|>"}
    return sorted(t for t in wanted if t and t in prompts.tokens)


def test_split_special_tokens_stay_text_for_the_demo_model(rt: Runtime) -> None:
    prompts = rt.prompts
    tokens = family_tokens(prompts)
    assert {"<image>", "</s>"} <= set(tokens)
    plain = prompts.render([turn("图形是什么颜色的？")])
    for token in tokens:
        for name, messages in split_forms(token, "图形是什么颜色的？").items():
            prompt = prompts.render(messages)
            prompts.check(prompt, pictures=1)  # raises if ids hold other special tokens than the template wrote
            ids = rt.processor.tokenizer(prompt.text, add_special_tokens=False)["input_ids"]
            assert prompts.count(ids) == prompts.count(
                rt.processor.tokenizer(prompts.render(_without(messages, token)).text,
                                       add_special_tokens=False)["input_ids"]), (token, name)
            assert prompt.specials[rt.processor.image_token] == 1, (token, name)
            if name.startswith(("across parts", "whole")):  # the demo's template joins a turn's parts directly
                assert JOINER in prompt.text, (token, name)
    # Text without any token's spelling renders exactly as the template alone does.
    assert plain.text == rt.processor.apply_chat_template([turn("图形是什么颜色的？")], add_generation_prompt=True)


def _without(messages: list[dict[str, Any]], token: str) -> list[dict[str, Any]]:
    """The same conversation with every client text emptied: what the template alone writes."""
    return [{**m, "content": "" if isinstance(m["content"], str) else
             [{**p, "text": ""} if p.get("type") == "text" else p for p in m["content"]]} for m in messages]


def test_a_split_token_at_a_join_the_template_makes_is_broken_in_the_clients_part(rt: Runtime) -> None:
    """A template that writes ``s>`` right after the client's text: ``</`` + ``s>`` is a real ``</s>``
    unless the client's part is broken."""

    class Joining:
        tokenizer = rt.processor.tokenizer
        image_token = rt.processor.image_token

        def apply_chat_template(self, messages: list[dict[str, Any]], **_: Any) -> str:
            return "".join(p["text"] for m in messages for p in m["content"] if p["type"] == "text") + "s> ASSISTANT:"

    prompts = Prompts(Joining())
    prompt = prompts.render([turn("说一说</", image=False)])
    assert prompt.text == f"说一说<{JOINER}/s> ASSISTANT:"
    assert prompt.specials == {}
    prompts.check(prompt, pictures=0)


def test_a_group_with_split_tokens_answers_every_row_as_alone(rt: Runtime,
                                                              samples: list[tuple[bytes, str, str]]) -> None:
    """The reported attack: one owner's split ``<image>`` / ``</s>`` rows batched with three other owners'
    questions. Before the fix every row of the group failed with 'Found total 5 <image> tokens'."""
    img, question, fact = samples[2]
    bad = [Item(messages=tuple(m), images=(img,), max_new_tokens=24)
           for m in (split_forms("<image>", question)["across parts"], split_forms("</s>", question)["across parts"],
                     [turn("<ima", "ge>", "<image>", question)])]
    good = [Item(sample_img, q, 24) for sample_img, q, _ in samples[:5]]
    group = bad[:1] + good[:2] + bad[1:] + good[2:]
    answers = rt.answer_batch(group)
    alone = [rt.answer_batch([item])[0] for item in group]
    assert all(a.ok for a in answers), [a.error for a in answers]
    assert [a.tokens for a in answers] == [a.tokens for a in alone]
    for answer, (_, _, want) in zip([answers[1], answers[2], *answers[5:]], samples[:5]):
        assert want in answer.answer
    assert max(a.batch_size for a in answers) == len(group)


def test_a_job_the_processor_cannot_encode_fails_alone_with_a_4xx_code(
        rt: Runtime, samples: list[tuple[bytes, str, str]], monkeypatch: pytest.MonkeyPatch) -> None:
    real = Engine.encode

    def encode(self: Engine, rows: Any) -> Any:
        if any("毒" in r.prompt for r in rows):
            raise ValueError("injected processor failure")
        return real(self, rows)

    monkeypatch.setattr(Engine, "encode", encode)
    items = [Item(img, q, 24) for img, q, _ in samples[:4]]
    items.insert(2, Item(samples[0][0], "毒：图中是什么形状？", 24))
    answers = rt.answer_batch(items)
    assert answers[2].error is not None and answers[2].error["code"] == ErrorCode.unprocessable_input.value
    assert not answers[2].error["retryable"] and "injected processor failure" in answers[2].error["message"]
    good = answers[:2] + answers[3:]
    assert all(a.ok for a in good)
    for answer, (_, _, fact) in zip(good, samples[:4]):
        assert fact in answer.answer


def run_group(scheduler: Scheduler, items: list[Item]) -> list[Answer]:
    answers: dict[int, Answer] = {}
    ticket = scheduler.submit(scheduler.runtime.prepare(items), on_answer=lambda i, a: answers.__setitem__(i, a))
    assert ticket.wait(120)
    return [answers[i] for i in range(len(items))]


@pytest.mark.parametrize("where", ["joining", "decoding"])
def test_a_job_that_breaks_the_model_fails_alone_and_its_group_is_answered(
        rt: Runtime, samples: list[tuple[bytes, str, str]], where: str) -> None:
    """A row that makes the model raise (a bug, not out-of-memory) is found by splitting: the others of a
    full group are answered token for token as alone, the row fails alone with unprocessable_input."""
    items = [Item(img, q, 24) for img, q, _ in samples[:7]]
    items.insert(5, Item(samples[0][0], "毒：图中是什么形状？", 24))
    alone = [rt.answer_batch([it])[0].tokens for it in items]
    failures = []
    hook = injected_row_failure("毒")

    def before_rows(rows: list[Any]) -> None:
        if where == "decoding" and not any(live.row is rows[0] for live in scheduler.engine.rows):
            return  # joins go through: the failure comes in a decode step
        try:
            hook(rows)
        except RuntimeError:
            failures.append(len(rows))
            raise

    scheduler = Scheduler(rt, max_rows=8)
    scheduler.before_rows = before_rows
    scheduler.start()
    try:
        answers = run_group(scheduler, items)
        # The scheduler is healthy afterwards: a new group runs as one batch again.
        after = run_group(scheduler, [Item(img, q, 24) for img, q, _ in samples[:4]])
    finally:
        scheduler.stop()
    bad = answers.pop(5)
    assert bad.error is not None and bad.error["code"] == ErrorCode.unprocessable_input.value
    assert not bad.error["retryable"]
    assert "alone" in bad.error["message"]
    assert all(a.ok for a in answers), [a.error for a in answers]
    assert [a.tokens for a in answers] == alone[:5] + alone[6:]
    for answer, (_, _, fact) in zip(answers, samples[:7]):
        assert fact in answer.answer
    assert failures[-1] == 1 and len(failures) == 4, failures  # 8 -> 4 -> 2 -> 1: found in three splits
    assert all(a.ok for a in after) and max(a.batch_size for a in after) == 4
    assert not scheduler._suspects


def test_streamed_rows_that_start_again_send_no_text_twice(rt: Runtime, samples: list[tuple[bytes, str, str]]) -> None:
    pieces: dict[int, list[str]] = {i: [] for i in range(4)}
    items = [Item(img, q, 24, on_text=pieces[i].append) for i, (img, q, _) in enumerate(samples[:3])]
    items.append(Item(samples[3][0], "毒：" + samples[3][1], 24, on_text=pieces[3].append))
    steps = threading.Event()

    def before_rows(rows: list[Any]) -> None:
        if sum(len(live.tokens) for live in scheduler.engine.rows) >= 8:
            steps.set()
        if steps.is_set():
            injected_row_failure("毒")(rows)

    scheduler = Scheduler(rt, max_rows=8)
    scheduler.before_rows = before_rows
    scheduler.start()
    try:
        answers = run_group(scheduler, items)
    finally:
        scheduler.stop()
    for i in range(3):
        assert answers[i].ok and "".join(pieces[i]) == answers[i].answer
    assert answers[3].error is not None
