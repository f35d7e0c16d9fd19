"""``n``, ``logprobs`` and ``top_logprobs`` through the real gateway, worker, Redis and S3 with the ``openai`` SDK
(issue 24, part 4): a seeded ``n=3`` gives the same three answers twice; log probabilities come in OpenAI's
shape, sorted, with the chosen token's; a streamed ``n=2`` reassembles per index to the answers asked whole;
the job's result (``/v1/jobs``, ``Client``) carries every choice; bad values are 400s naming the parameter,
and nothing is stored."""

from __future__ import annotations

from typing import Any

import openai
import pytest

from tests.gateway.conftest import Gateway
from tests.gateway.test_batches import TERMINAL, URL, jsonl, read_lines, upload, wait_for, worksheets
from tests.gateway.test_batches import knows as knows_example
from tests.gateway.test_openai import Keys, ask, chat_gateway, knows, sdk  # noqa: F401 - chat_gateway is a fixture
from tests.gateway.test_openai_errors import stored
from tuwen.pipeline.client import Client
from tuwen.pipeline.errors import InvalidParams
from tuwen.pipeline.schema import MAX_CHOICES
from tuwen.workers.demo.samples import load_samples

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def test_n_with_a_seed_gives_the_same_answers_twice(chat_gateway: Gateway, new_key: Keys) -> None:
    sample = load_samples()[9]  # the demo model is sure of most samples' answers even at temperature 2: not this one
    asked: dict[str, Any] = dict(model="tuwen", messages=[ask(sample)], max_tokens=24, n=3, seed=1234, temperature=2.0,
                                 logprobs=True)
    answers = []
    for token in (new_key(), new_key()):  # two owners: no answer comes from the other's cache
        with sdk(chat_gateway, token) as client:
            answers.append(client.chat.completions.create(**asked))
    first, again = answers
    assert [c.index for c in first.choices] == [0, 1, 2]
    texts = [c.message.content for c in first.choices]
    assert texts == [c.message.content for c in again.choices], "a seeded n=3 is reproducible"
    assert len(set(texts)) > 1, "the choices are sampled apart (seed + index)"
    assert all(c.finish_reason in ("stop", "length") for c in first.choices)
    # usage: the prompt once, every choice's tokens
    with sdk(chat_gateway, new_key()) as client:
        one = client.chat.completions.create(**{**asked, "n": 1})
    assert one.choices[0].message.content == texts[0], "choice 0 is the answer of the same seed with n=1"
    assert first.usage is not None and one.usage is not None
    assert first.usage.prompt_tokens == one.usage.prompt_tokens
    counted = [len(c.logprobs.content or []) for c in first.choices if c.logprobs is not None]
    assert len(counted) == 3 and first.usage.completion_tokens == sum(counted) > one.usage.completion_tokens


def test_greedy_choices_are_the_same_right_answer(chat_gateway: Gateway, new_key: Keys) -> None:
    sample = load_samples()[0]
    with sdk(chat_gateway, new_key()) as client:
        got = client.chat.completions.create(model="tuwen", messages=[ask(sample)], max_tokens=32, n=2)
    assert len(got.choices) == 2 and got.choices[0].message.content == got.choices[1].message.content
    assert knows(got.choices[0].message.content or "", sample)


def test_logprobs_in_openais_shape(chat_gateway: Gateway, new_key: Keys) -> None:
    sample = load_samples()[1]
    with sdk(chat_gateway, new_key()) as client:
        got = client.chat.completions.create(model="tuwen", messages=[ask(sample)], max_tokens=32, logprobs=True,
                                             top_logprobs=5)
        plain = client.chat.completions.create(model="tuwen", messages=[ask(sample)], max_tokens=32)
    choice = got.choices[0]
    assert choice.message.content == plain.choices[0].message.content and plain.choices[0].logprobs is None
    assert knows(choice.message.content or "", sample)
    content = choice.logprobs.content  # type: ignore[union-attr]
    assert content and got.usage is not None and len(content) == got.usage.completion_tokens
    assert "".join(e.token for e in content).strip() == (choice.message.content or "").strip()
    for entry in content:
        assert entry.logprob <= 0 and bytes(entry.bytes or []).decode("utf-8", errors="replace") == entry.token
        top = [t.logprob for t in entry.top_logprobs]
        assert len(top) == 5 and top == sorted(top, reverse=True)
        # greedy: the chosen token is the likeliest, with its own logprob
        assert (entry.top_logprobs[0].token, entry.top_logprobs[0].logprob) == (entry.token, entry.logprob)


def test_a_streamed_n_reassembles_per_index_to_the_whole_answers(chat_gateway: Gateway, new_key: Keys) -> None:
    sample = load_samples()[5]
    asked: dict[str, Any] = dict(model="tuwen", messages=[ask(sample)], max_tokens=32, n=2, logprobs=True,
                                 top_logprobs=2)
    with sdk(chat_gateway, new_key()) as client:
        whole = client.chat.completions.create(**asked)
        texts: dict[int, str] = {}
        tokens: dict[int, list[str]] = {}
        finish: dict[int, str | None] = {}
        for chunk in client.chat.completions.create(**asked, stream=True):
            for c in chunk.choices:
                texts[c.index] = texts.get(c.index, "") + (c.delta.content or "")
                tokens.setdefault(c.index, []).extend(e.token for e in (c.logprobs.content or [] if c.logprobs else []))
                if c.finish_reason is not None:
                    finish[c.index] = c.finish_reason
    assert sorted(texts) == [0, 1]
    for c in whole.choices:
        assert texts[c.index] == c.message.content and finish[c.index] == c.finish_reason
        assert tokens[c.index] == [e.token for e in c.logprobs.content or []]  # type: ignore[union-attr]


def test_the_jobs_result_carries_every_choice(chat_gateway: Gateway, new_key: Keys) -> None:
    sample = load_samples()[2]
    client = Client(chat_gateway.settings)
    job = client.submit(sample.path.read_bytes(), sample.question,
                        params={"n": 2, "temperature": 1.0, "seed": 9, "max_new_tokens": 16, "logprobs": True})
    result = client.wait(job.id, timeout=120)
    assert result.choices is not None and [c.index for c in result.choices] == [0, 1]
    assert result.answer == result.choices[0].answer and result.finish_reason == result.choices[0].finish_reason
    assert result.generated_tokens == sum(c.generated_tokens for c in result.choices)
    assert all(c.logprobs is not None and len(c.logprobs) == c.generated_tokens for c in result.choices)
    with chat_gateway.client(new_key("default")) as api:
        view = api.get(f"/v1/jobs/{job.id}").json()
    assert [c["answer"] for c in view["choices"]] == [c.answer for c in result.choices]


def test_batch_lines_take_n_and_logprobs(chat_gateway: Gateway, new_key: Keys) -> None:
    lines, examples = worksheets(3, seed=24, prefix="choices")
    lines[0]["body"].update(n=2, temperature=1.0, seed=3)
    lines[1]["body"].update(logprobs=True, top_logprobs=2)
    lines[2]["body"].update(n=MAX_CHOICES + 1)
    with sdk(chat_gateway, new_key()) as client:
        batch = client.batches.create(input_file_id=upload(client, jsonl(lines)), endpoint=URL, completion_window="24h")
        done = wait_for(client, batch.id, lambda b: b.status in TERMINAL)
        outputs = {x["custom_id"]: x["response"]["body"] for x in read_lines(client, done.output_file_id)}
        errors = {x["custom_id"]: x["response"]["body"] for x in read_lines(client, done.error_file_id)}
    two, probed = outputs["choices-0000"]["choices"], outputs["choices-0001"]["choices"]
    assert [c["index"] for c in two] == [0, 1] and all(c["finish_reason"] in ("stop", "length") for c in two)
    assert len(probed) == 1 and knows_example(probed[0]["message"]["content"], examples["choices-0001"])
    assert all(len(e["top_logprobs"]) == 2 for e in probed[0]["logprobs"]["content"])
    refused = errors["choices-0002"]["error"]
    assert refused["code"] == "invalid_params" and refused["message"].startswith("n:")


#: name → (request fields, the param the 400 names)
BAD: dict[str, tuple[dict[str, Any], str]] = {
    "n=0": ({"n": 0}, "n"),
    "n over the limit": ({"n": MAX_CHOICES + 1}, "n"),
    "top_logprobs=21": ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    "top_logprobs without logprobs": ({"top_logprobs": 2}, "top_logprobs"),
    "logprobs not a boolean": ({"logprobs": "yes"}, "logprobs"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_values_are_refused_by_name_and_nothing_is_stored(chat_gateway: Gateway, new_key: Keys, case: str) -> None:
    fields, param = BAD[case]
    client = Client(chat_gateway.settings)
    before = stored(client)
    sample = load_samples()[4]
    with sdk(chat_gateway, new_key()) as api, pytest.raises(openai.BadRequestError) as refused:
        api.chat.completions.create(model="tuwen", messages=[ask(sample)], max_tokens=8, extra_body=fields)
    assert refused.value.status_code == 400 and refused.value.code == "invalid_params", refused.value
    assert refused.value.param == param
    if param != "logprobs":  # the same limits in the client (what /v1/jobs and bulk lines go through)
        with pytest.raises(InvalidParams) as direct:
            client.submit(sample.path.read_bytes(), sample.question, params=fields)
        assert direct.value.code == "invalid_params" and param in direct.value.message
    assert stored(client) == before
