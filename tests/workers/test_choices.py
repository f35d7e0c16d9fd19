"""``n`` choices and ``logprobs`` per row in the decode loop (issue 24, part 4): the choices of a row come from
one prefill (counted on the model's forward) and decode as rows of their own, each with its own generator
(choice ``i`` seeded ``seed + i``), the same alone and in any batch; log probabilities are the log-softmax of
the model's own logits (checked against ``generate(output_logits=True)``), after the row's processors."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from tests.workers.test_engine import engine_for, rows_for, staggered
from tests.workers.test_families import items
from tests.workers.test_scheduler import rt  # noqa: F401 - fixture: the demo runtime
from tuwen.workers.engine.batch import Row, Sampling
from tuwen.workers.engine.model import Item, Runtime
from tuwen.workers.engine.requests import Answer, Group

HOT = Sampling(temperature=1.5, top_p=0.95, seed=1234)


@pytest.fixture
def prefills(rt: Runtime) -> Iterator[list[int]]:
    """The batch size of every prefill forward the model runs (a decode step feeds one token per row)."""
    seen: list[int] = []

    def count(module: Any, args: Any, kwargs: dict[str, Any]) -> None:
        ids = kwargs.get("input_ids")
        if ids is not None and ids.shape[1] > 1:
            seen.append(int(ids.shape[0]))

    handle = rt.model.register_forward_pre_hook(count, with_kwargs=True)
    yield seen
    handle.remove()


def like(row: Row, key: Any, sampling: Sampling, **extra: Any) -> Row:
    return Row(key=key, prompt=row.prompt, images=row.images, max_new_tokens=row.max_new_tokens, sampling=sampling,
               **extra)


def test_the_choices_of_a_row_share_one_prefill(rt: Runtime, prefills: list[int]) -> None:
    its = items(24)
    plain = rows_for(rt, its[:2])
    alone = [f.tokens for f in engine_for(rt).run(plain)]
    prefills.clear()
    engine = engine_for(rt)
    rows = [like(plain[0], "three", Sampling(n=3)), like(plain[1], "one", Sampling())]
    done = engine.add(rows)
    assert prefills == [2], "one prefill for both rows: the three choices copy their row's cache"
    assert engine.size == 4, "three choices and one row decode as four rows"
    while engine.size:
        done += engine.step()
    assert prefills == [2]
    got = {f.row.key: f for f in done}
    assert len(done) == 2, "one Finished per row, whatever its n"
    three = got["three"]
    assert [c.choice for c in three.choices] == [0, 1, 2]
    assert [c.tokens for c in three.choices] == [alone[0]] * 3, "greedy choices are all the greedy answer"
    assert three.tokens == alone[0] and got["one"].tokens == alone[1] and not got["one"].choices


def test_seeded_choices_are_the_same_alone_and_in_any_batch(rt: Runtime) -> None:
    its = items(24)
    target = rows_for(rt, its[:1])[0]
    (alone,) = engine_for(rt).run([like(target, "t", Sampling(temperature=1.5, top_p=0.95, seed=1234, n=3))])
    singles = [engine_for(rt).run([like(target, i, Sampling(temperature=1.5, top_p=0.95, seed=1234 + i))])[0].tokens
               for i in range(3)]
    assert [c.tokens for c in alone.choices] == singles, "choice i samples as a job seeded seed + i"
    assert len({tuple(t) for t in singles}) > 1, "the choices must differ, or the seeds prove nothing"
    # Beside other rows (sampled, greedy and a constrained one), joining at different steps
    others = rows_for(rt, its[1:5], sampling=Sampling(temperature=0.8, top_p=0.9, seed=7, n=2))
    shaped = like(rows_for(rt, its[5:6])[0], "json", Sampling(n=2), grammar=rt.grammar({"type": "json_object"}))
    mixed = [others[0], shaped, like(target, "t", Sampling(temperature=1.5, top_p=0.95, seed=1234, n=3)),
             *rows_for(rt, its[6:8])]
    finished = staggered(engine_for(rt), others[1:] + mixed, {1: 2, 2: 2})
    in_batch = next(f for f in finished if f.row.key == "t")
    assert [c.tokens for c in in_batch.choices] == [c.tokens for c in alone.choices]
    assert max(f.batch_size for f in finished) >= 8


def test_a_constrained_row_with_choices_is_the_same_alone_and_in_a_batch(rt: Runtime) -> None:
    its = items(24)
    fmt = {"type": "json_object"}
    target = like(rows_for(rt, its[:1])[0], "t", Sampling(temperature=1.0, seed=5, n=2), grammar=rt.grammar(fmt))
    (alone,) = engine_for(rt).run([target])
    (in_batch, *_) = engine_for(rt).run([target, *rows_for(rt, its[1:4], sampling=HOT)])
    assert [c.tokens for c in in_batch.choices] == [c.tokens for c in alone.choices]
    assert all(c.text.startswith("{") for c in alone.choices)


def reference(rt: Runtime, it: Item) -> tuple[list[int], list[torch.Tensor]]:
    """``generate`` on one row alone, greedy: its tokens and the log-softmax of the model's own logits per step."""
    prompt = rt.processor.apply_chat_template(rt.messages(it.question), add_generation_prompt=True)
    enc = rt.processor(images=[it.image.convert("RGB")], text=[prompt], return_tensors="pt")  # type: ignore[union-attr]
    eos = rt.model.generation_config.eos_token_id
    with torch.inference_mode():
        out = rt.model.generate(**enc, max_new_tokens=it.max_new_tokens, do_sample=False, output_logits=True,
                                return_dict_in_generate=True, pad_token_id=rt.processor.tokenizer.pad_token_id,
                                eos_token_id=eos)
    ids = out.sequences[0, enc["input_ids"].shape[1]:].tolist()
    return ids, [torch.log_softmax(step[0].float(), dim=-1) for step in out.logits]


def test_logprobs_of_greedy_rows_are_the_log_softmax_of_the_models_logits(rt: Runtime) -> None:
    its = items(16)
    asked = Sampling(logprobs=True, top_logprobs=5)
    rows = [like(r, i, asked if i < 3 else Sampling()) for i, r in enumerate(rows_for(rt, its[:5]))]
    finished = {f.row.key: f for f in engine_for(rt).run(rows)}
    for i, it in enumerate(its[:3]):
        ids, logps = reference(rt, it)
        f = finished[i]
        assert f.steps is not None and len(f.steps) == len(f.tokens) and f.tokens == ids[:len(f.tokens)]
        for step, logp in zip(f.steps, logps):
            assert step.logprob == pytest.approx(float(logp[step.token]), abs=1e-4)
            top = logp.topk(5)
            assert [t for t, _ in step.top] == top.indices.tolist()
            assert [v for _, v in step.top] == pytest.approx(top.values.tolist(), abs=1e-4)
            assert step.top[0][0] == step.token, "greedy: the chosen token is the likeliest"
    assert finished[3].steps is None and finished[4].steps is None, "rows that did not ask keep nothing"


def test_logprobs_come_after_the_processors(rt: Runtime) -> None:
    """The grammar's mask: a JSON object's first token can only be ``{`` (probability 1, and no alternative);
    temperature: the sampled row's numbers are the log-softmax of its logits over the temperature."""
    it = items(12)[0]
    row = rows_for(rt, [it])[0]
    fmt = {"type": "json_object"}
    (shaped,) = engine_for(rt).run([like(row, 0, Sampling(logprobs=True, top_logprobs=20), grammar=rt.grammar(fmt))])
    assert shaped.steps is not None and shaped.text.startswith("{")
    first = shaped.steps[0]
    assert first.logprob == pytest.approx(0.0, abs=1e-6) and len(first.top) == 1
    _, logps = reference(rt, Item(it.image, it.question, 1))
    (hot,) = engine_for(rt).run([like(row, 0, Sampling(temperature=2.0, seed=3, logprobs=True, top_logprobs=3))])
    assert hot.steps is not None
    raw = logps[0]  # the first step's logits are the same whatever was sampled
    assert hot.steps[0].logprob == pytest.approx(float(torch.log_softmax(raw / 2.0, -1)[hot.steps[0].token]), abs=1e-4)


def test_streamed_choices_and_logprobs_reassemble_to_the_answers(rt: Runtime) -> None:
    its = items(24)
    pieces: dict[int, str] = {}
    streamed: dict[int, list[dict[str, Any]]] = {}

    def on_text(piece: str, choice: int = 0, logprobs: list[dict[str, Any]] | None = None) -> None:
        pieces[choice] = pieces.get(choice, "") + piece
        streamed.setdefault(choice, []).extend(logprobs or [])

    row = like(rows_for(rt, its[:1])[0], 0, Sampling(temperature=1.2, seed=11, n=2, logprobs=True, top_logprobs=2),
               on_text=on_text)
    group_like = [row, *rows_for(rt, its[1:3])]
    (f, *_) = engine_for(rt).run(group_like)
    answer = rt.finish(Group([Answer()], [], None), f)
    assert answer.choices is not None and len(answer.choices) == 2
    assert answer.generated_tokens == sum(c["generated_tokens"] for c in answer.choices)
    for c in answer.choices:
        assert pieces[c["index"]] == c["answer"]
        assert streamed[c["index"]] == c["logprobs"], "each token's entry streamed once, in order"
        assert len(c["logprobs"]) == c["generated_tokens"]
        for entry in c["logprobs"]:
            assert bytes(entry["bytes"]).decode("utf-8", errors="replace") == entry["token"]
            assert [t["logprob"] for t in entry["top_logprobs"]] == sorted(
                (t["logprob"] for t in entry["top_logprobs"]), reverse=True)
    json.dumps(answer.choices)  # the job's result carries them as they are

