"""The continuous-batching engine: rows that join mid-run and leave when done answer exactly as alone.

Every family's tiny checkpoint plus the bundled demo model (whose answers end at different lengths, so
rows really leave mid-run), fp32 and greedy, against ``model.generate`` on each row alone.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.workers.test_families import FAMILIES, QUESTIONS, items
from tuwen.pipeline.settings import Settings
from tuwen.workers.engine.batch import Engine, Finished, Row, Sampling
from tuwen.workers.demo import bundled_demo_model
from tuwen.workers.engine.model import Item, Runtime


@pytest.fixture(scope="module", params=["demo", *[f.name for f in FAMILIES]])
def loaded(request: pytest.FixtureRequest, tiny_checkpoint: Callable[[str], Path]) -> Runtime:
    path = bundled_demo_model() if request.param == "demo" else tiny_checkpoint(request.param)
    rt = Runtime(Settings(model_path=path, torch_threads=1, max_new_tokens=24))
    rt.load()
    return rt


def engine_for(rt: Runtime) -> Engine:
    eos = rt.model.generation_config.eos_token_id
    return Engine(rt.model, rt.processor, set(eos if isinstance(eos, list) else [eos]), rt.processor.tokenizer.pad_token_id)


def rows_for(rt: Runtime, its: list[Item], **extra: Any) -> list[Row]:
    return [Row(key=i, prompt=rt.processor.apply_chat_template(rt.messages(it.question), add_generation_prompt=True),
                images=[it.image.convert("RGB")], max_new_tokens=it.max_new_tokens or 24, **extra)  # type: ignore[union-attr]
            for i, it in enumerate(its)]


def generate_alone(rt: Runtime, it: Item) -> list[int]:
    """The reference: ``model.generate`` on one row, greedy, cut at the end of sequence (the item's own
    ``messages`` if it has them, else its question about its picture)."""
    import torch

    messages = [dict(m) for m in it.messages] or rt.messages(it.question)
    prompt = rt.processor.apply_chat_template(messages, add_generation_prompt=True)
    pictures = [p.convert("RGB") for p in (it.images or (it.image,))]  # type: ignore[union-attr]
    enc = rt.processor(images=pictures, text=[prompt], return_tensors="pt")
    eos = rt.model.generation_config.eos_token_id
    with torch.inference_mode():
        out = rt.model.generate(**enc, max_new_tokens=it.max_new_tokens, do_sample=False,
                                pad_token_id=rt.processor.tokenizer.pad_token_id, eos_token_id=eos)
    ids = out[0, enc["input_ids"].shape[1]:].tolist()
    stops = set(eos if isinstance(eos, list) else [eos])
    return ids[: next((k for k, t in enumerate(ids) if t in stops), len(ids))]


def staggered(engine: Engine, rows: list[Row], joins: dict[int, int]) -> list[Finished]:
    """Start with two rows; at decode step s, ``joins[s]`` more rows join. Returns every finished row."""
    done = engine.add(rows[:2])
    waiting, step = rows[2:], 0
    while engine.size or waiting:
        take = joins.get(step, 0) or (len(waiting) if not engine.size else 0)
        if take and waiting:
            done += engine.add(waiting[:take])
            waiting = waiting[take:]
        done += engine.step()
        step += 1
    return done


def test_rows_joining_mid_run_answer_as_alone(loaded: Runtime) -> None:
    its = items(24)
    alone = [generate_alone(loaded, it) for it in its]
    assert len({tuple(t) for t in alone}) > 1, "the rows must differ, or identity proves nothing"
    finished = staggered(engine_for(loaded), rows_for(loaded, its), {1: 2, 3: 1, 4: 1})
    got = {f.row.key: f.tokens for f in finished}
    assert [got[i] for i in range(len(its))] == alone
    assert max(f.batch_size for f in finished) >= 3, "rows must have shared decode steps"


def test_parked_rows_come_back_where_they_left_off_and_answer_as_alone(loaded: Runtime) -> None:
    """Rows that give way (``park``) while others join and leave, then come back (``unpark``) into a batch
    of another width, answer token for token as ``generate`` alone: their cache, positions (M-RoPE offsets
    included) and last token travel with them."""
    its = items(24)
    alone = [generate_alone(loaded, it) for it in its]
    engine, rows = engine_for(loaded), rows_for(loaded, its)
    done = engine.add(rows[:4])
    done += engine.step() + engine.step()
    parked = engine.park([i for i in (0, 2) if i < engine.size])
    assert parked.rows and engine.size == 4 - len(done) - len(parked.rows)
    done += engine.add(rows[4:])  # joins a batch the parked rows are not in
    for _ in range(3):
        done += engine.step()
    back, rest = parked.split(1)
    engine.unpark(back)
    done += engine.step()
    if rest is not None:
        engine.unpark(rest)
    while engine.size:
        done += engine.step()
    got = {f.row.key: f.tokens for f in done}
    assert [got[i] for i in range(len(its))] == alone


def test_demo_rows_leave_when_done_and_text_streams_whole() -> None:
    rt = Runtime(Settings(model_path=bundled_demo_model(), torch_threads=1, max_new_tokens=48))
    rt.load()
    its = items(48)
    pieces: dict[int, list[str]] = {i: [] for i in range(len(its))}
    rows = [Row(key=r.key, prompt=r.prompt, images=r.images, max_new_tokens=48,
                on_text=lambda s, k=r.key: pieces[k].append(s)) for r in rows_for(rt, its)]
    engine = engine_for(rt)
    sizes = []
    engine.add(rows)
    finished: list[Finished] = []
    while engine.size:
        sizes.append(engine.size)
        finished += engine.step()
    assert sizes == sorted(sizes, reverse=True) and sizes[-1] < sizes[0], "finished rows must leave at once"
    tok = rt.processor.tokenizer
    for f in finished:
        assert f.finish_reason == "stop"
        assert "".join(pieces[f.row.key]) == f.text == tok.decode(f.tokens, skip_special_tokens=True).strip()
        assert len(pieces[f.row.key]) >= 2 and all(pieces[f.row.key])
        assert "\ufffd" not in f.text


def test_length_limit_and_stop_strings() -> None:
    rt = Runtime(Settings(model_path=bundled_demo_model(), torch_threads=1, max_new_tokens=48))
    rt.load()
    it = items(48)[0]
    (full,) = engine_for(rt).run(rows_for(rt, [it]))
    (short,) = engine_for(rt).run(rows_for(rt, [Item(it.image, it.question, 3)]))
    assert short.finish_reason == "length" and short.tokens == full.tokens[:3]
    cut = full.text[len(full.text) // 2]
    streamed: list[str] = []
    (stopped,) = engine_for(rt).run([Row(key=0, prompt=rows_for(rt, [it])[0].prompt, images=[it.image.convert("RGB")],
                                         max_new_tokens=48, stop=[cut], on_text=streamed.append)])
    assert stopped.finish_reason == "stop" and stopped.text == full.text[: full.text.index(cut)]
    assert "".join(streamed) == stopped.text


def test_seeded_sampling_is_the_same_alone_and_in_any_batch() -> None:
    rt = Runtime(Settings(model_path=bundled_demo_model(), torch_threads=1, max_new_tokens=24))
    rt.load()
    its = items(24)
    hot = Sampling(temperature=1.5, top_p=0.95, seed=1234)
    target = rows_for(rt, its[:1], sampling=hot)[0]
    (alone,) = engine_for(rt).run([target])
    others = rows_for(rt, its[1:] + its[1:3], sampling=Sampling(temperature=0.8, top_p=0.9, seed=7))
    mixed = others[:3] + [Row(key="t", prompt=target.prompt, images=target.images, max_new_tokens=24, sampling=hot)]
    engine = engine_for(rt)
    finished = staggered(engine, others[3:] + mixed, {1: 2, 2: 2})
    in_batch = next(f for f in finished if f.row.key == "t")
    assert in_batch.tokens == alone.tokens
    greedy = engine_for(rt).run(rows_for(rt, its[:1]))[0]
    other_seed = engine_for(rt).run([Row(key=0, prompt=target.prompt, images=target.images, max_new_tokens=24,
                                         sampling=Sampling(temperature=1.5, top_p=0.95, seed=99))])[0]
    assert alone.tokens != greedy.tokens or other_seed.tokens != alone.tokens, "sampling must change something"


def test_logit_bias_moves_its_row_alone() -> None:
    """OpenAI's ``logit_bias`` per row: -100 bans the greedy first token, +100 forces a token; the free row in
    the same batch answers as alone."""
    rt = Runtime(Settings(model_path=bundled_demo_model(), torch_threads=1, max_new_tokens=8))
    rt.load()
    its = items(8)
    free, plain = engine_for(rt).run(rows_for(rt, its[:2]))
    first, forced = plain.tokens[0], 42 if plain.tokens[0] != 42 else 43
    rows = rows_for(rt, its[:2])
    banned = Row(key="ban", prompt=rows[1].prompt, images=rows[1].images, max_new_tokens=8,
                 sampling=Sampling(logit_bias=((first, -100.0),)))
    pushed = Row(key="push", prompt=rows[1].prompt, images=rows[1].images, max_new_tokens=8,
                 sampling=Sampling(logit_bias=((forced, 100.0),)))
    got = {f.row.key: f.tokens for f in engine_for(rt).run([rows[0], banned, pushed])}
    assert got[0] == free.tokens, "the free row is untouched"
    assert got["ban"][0] != first and got["push"][0] == forced


def test_prefix_reuse_answers_as_alone(loaded: Runtime) -> None:
    """Reuse (``engine.reuse``): rows of one join on one picture share one prefill of their prefix, a later
    join finds it cached, pictures in a new prompt (both at once) find their features in the encoder cache;
    every answer is token for token ``generate`` alone. Another owner's identical picture shares nothing."""
    from tuwen.workers.engine.reuse import Reuse

    its = items(24)
    page, other = its[0].image, its[1].image
    asked = [Item(page, q, 24) for q in QUESTIONS[:4]] + [Item(other, q, 24) for q in QUESTIONS[2:4]] + [its[2]]
    both = ({"role": "user", "content": [{"type": "image"}, {"type": "image"},
                                         {"type": "text", "text": QUESTIONS[4]}]},)
    asked.append(Item(max_new_tokens=24, messages=both, images=(page, other)))
    alone = [generate_alone(loaded, it) for it in asked]
    assert len({tuple(t) for t in alone}) > 1, "the answers must differ, or identity proves nothing"
    reuse = Reuse(loaded.model, 1 << 30, 1 << 30)
    engine = engine_for(loaded)
    engine.reuse = reuse
    prompt = loaded.processor.apply_chat_template([dict(m) for m in both], add_generation_prompt=True)
    pictures = [page.convert("RGB"), other.convert("RGB")]  # type: ignore[union-attr]
    rows = rows_for(loaded, asked[:-1]) + [Row(key=7, prompt=prompt, images=pictures, max_new_tokens=24)]
    stranger = Row(key="b", prompt=rows[0].prompt, images=rows[0].images, max_new_tokens=24, scope="b")
    done = engine.add([rows[0], rows[1], rows[4], stranger, rows[6], rows[2]])
    assert (reuse.prefix_hits, reuse.prefix_misses, len(reuse.prefixes)) == (2, 4, 4), "the page's three: one prefill"
    assert (reuse.features.hits, reuse.features.misses) == (0, 4), "each owner's picture through the tower once"
    done += engine.step() + engine.step()
    done += engine.add([rows[3], rows[5], rows[7]])  # the page and the other picture again: cached prefixes
    while engine.size:
        done += engine.step()
    got = {f.row.key: f.tokens for f in done}
    assert [got[i] for i in range(len(asked))] == alone
    assert got["b"] == alone[0]
    assert (reuse.prefix_hits, reuse.prefix_misses) == (4, 5)
    assert (reuse.features.hits, reuse.features.misses) == (2, 4), "both pictures in a new prompt: features cached"
