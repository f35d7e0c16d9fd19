"""The client matrix (issue 22): popular OpenAI clients work against tuwen by changing ``base_url`` alone.

Each client as it is (versions held by the ``clients`` extra), against a real gateway, a real worker with
the demo model, Redis and S3; every answer is checked against its picture's known fact.

* the ``openai`` SDK: sync and async, each whole and streamed;
* LangChain's ``ChatOpenAI``: ``invoke`` with a picture, ``stream``, ``batch``, ``ainvoke``;
* LiteLLM: ``completion`` and ``acompletion`` with ``model="openai/tuwen"`` and ``api_base``;
* an eval harness's calling pattern: a long multiple-choice prompt with a picture, ``max_tokens=1024`` and an
  ``sk-`` key, answered to its end (on a tiny long-context checkpoint: the demo model's context is 512);
* request shapes and parameters clients send that tuwen used to refuse: now 2xx, the ignored ones named in
  ``tuwen-ignored-params``;
* docs/openai.md's client snippets, run as written.
"""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from openai import AsyncOpenAI

from tuwen.pipeline.settings import Settings
from tests.gateway.conftest import Gateway, run_doc_snippet
from tests.gateway.test_openai import ask, chat_gateway, data_url, knows, sdk  # noqa: F401 - chat_gateway: fixture
from tuwen.workers.demo.samples import Sample, load_samples

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # offline: LiteLLM's bundled price list

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

Keys = Callable[..., str]
ROOT = Path(__file__).resolve().parents[2]


def langchain_message(sample: Sample) -> Any:
    from langchain_core.messages import HumanMessage

    return HumanMessage(content=[{"type": "image_url", "image_url": {"url": data_url(sample.path.read_bytes())}},
                                 {"type": "text", "text": sample.question}])


# -- the openai SDK ---------------------------------------------------------------------------------------------
def test_openai_sdk_async_streaming_names_the_fact(chat_gateway: Gateway, new_key: Keys) -> None:
    sample = load_samples()[2]
    token = new_key()

    async def main() -> tuple[str, list[str | None]]:
        async with AsyncOpenAI(base_url=chat_gateway.url + "/v1", api_key=token, max_retries=0) as client:
            stream = await client.chat.completions.create(model="tuwen", messages=[ask(sample)], stream=True)
            pieces, reasons = [], []
            async for chunk in stream:
                if chunk.choices:
                    pieces.append(chunk.choices[0].delta.content or "")
                    reasons.append(chunk.choices[0].finish_reason)
            return "".join(pieces), reasons

    text, reasons = asyncio.run(main())
    assert knows(text, sample), text
    assert reasons[-1] == "stop" and all(r is None for r in reasons[:-1])


def test_openai_sdk_default_budget_is_not_64_tokens(chat_gateway: Gateway, new_key: Keys) -> None:
    """No max_tokens: the answer may run to the context (or the server's cap); a larger max_tokens than the
    server's cap is a 400 that names the cap, never a quiet cut."""
    sample = load_samples()[0]
    with sdk(chat_gateway, new_key()) as client:
        answer = client.chat.completions.create(model="tuwen", messages=[ask(sample)])
        cap = chat_gateway.settings.max_new_tokens
        with pytest.raises(Exception) as over:
            client.chat.completions.create(model="tuwen", messages=[ask(sample)], max_tokens=cap + 1)
    assert answer.choices[0].finish_reason == "stop" and knows(answer.choices[0].message.content or "", sample)
    assert getattr(over.value, "status_code", None) == 400 and str(cap) in str(over.value)


# -- LangChain ----------------------------------------------------------------------------------------------------
def test_langchain_chat_openai_invoke_stream_batch_ainvoke(chat_gateway: Gateway, new_key: Keys) -> None:
    from langchain_openai import ChatOpenAI

    samples = load_samples()[:4]
    llm = ChatOpenAI(model="tuwen", base_url=chat_gateway.url + "/v1", api_key=new_key(), max_retries=0,
                     timeout=120)
    invoked = llm.invoke([langchain_message(samples[0])])
    streamed = "".join(str(chunk.content) for chunk in llm.stream([langchain_message(samples[1])]))
    batched = llm.batch([[langchain_message(s)] for s in samples[2:4]])
    awaited = asyncio.run(llm.ainvoke([langchain_message(samples[3])]))
    answers = [str(invoked.content), streamed, *(str(m.content) for m in batched), str(awaited.content)]
    expected = [samples[0], samples[1], samples[2], samples[3], samples[3]]
    assert all(knows(a, s) for a, s in zip(answers, expected)), list(zip(answers, [s.facts for s in expected]))
    assert invoked.response_metadata.get("finish_reason") == "stop"


# -- LiteLLM ------------------------------------------------------------------------------------------------------
def test_litellm_completion_and_acompletion(chat_gateway: Gateway, new_key: Keys) -> None:
    import litellm

    samples = load_samples()[4:6]
    token = new_key()
    common = dict(model="openai/tuwen", api_base=chat_gateway.url + "/v1", api_key=token, num_retries=0)
    first = litellm.completion(messages=[ask(samples[0])], **common)
    second = asyncio.run(litellm.acompletion(messages=[ask(samples[1])], **common))
    assert knows(first.choices[0].message.content or "", samples[0]), first.choices[0].message.content
    assert knows(second.choices[0].message.content or "", samples[1]), second.choices[0].message.content


# -- shapes and parameters clients send ---------------------------------------------------------------------------
def shapes(sample: Sample) -> dict[str, dict[str, Any]]:
    """Requests OpenAI takes that tuwen used to refuse with a 400; each must be answered now."""
    picture = {"type": "image_url", "image_url": {"url": data_url(sample.path.read_bytes())}}
    text = {"type": "text", "text": sample.question}
    return {
        "a system message after the first turn": {"messages": [
            ask(sample), {"role": "assistant", "content": "好的。"}, {"role": "system", "content": "请简短回答。"},
            {"role": "user", "content": sample.question}]},
        "a developer message first": {"messages": [{"role": "developer", "content": "你是一位老师。"}, ask(sample)]},
        "an assistant message last (a prefill)": {"messages": [ask(sample), {"role": "assistant", "content": "图"}]},
        "a picture with no text": {"messages": [{"role": "user", "content": [picture]}]},
        "null and empty content": {"messages": [
            {"role": "system", "content": ""}, ask(sample), {"role": "assistant", "content": None},
            {"role": "user", "content": [picture, text]}]},
        "a message name": {"messages": [{**ask(sample), "name": "pupil_7"}]},
        "cache_control on a part": {"messages": [{"role": "user", "content": [
            picture, {**text, "cache_control": {"type": "ephemeral"}}]}]},
        "vendor parameters": {"messages": [ask(sample)], "extra_body": {
            "top_k": 20, "min_p": 0.05, "repetition_penalty": 1.05, "chat_template_kwargs": {"enable_thinking": False},
            "best_of": 1}},
        "penalties": {"messages": [ask(sample)], "frequency_penalty": 0.2, "presence_penalty": 0.1},
    }


def test_shapes_and_parameters_clients_send_are_answered(chat_gateway: Gateway, new_key: Keys) -> None:
    sample = load_samples()[2]
    got = {}
    with sdk(chat_gateway, new_key()) as client:
        for name, request in shapes(sample).items():
            raw = client.chat.completions.with_raw_response.create(model="tuwen", max_tokens=32, **request)
            completion = raw.parse()
            got[name] = (completion.choices[0].message.content or "", raw.headers.get("tuwen-ignored-params"))
    for name, (answer, _) in got.items():
        if name != "a picture with no text":  # no question: any true sentence about the picture will do
            assert any(fact in answer for fact in sample.facts) or name.startswith("an assistant"), (name, answer)
    assert got["an assistant message last (a prefill)"][0] and not got["an assistant message last (a prefill)"][0] \
        .startswith("图图")
    assert got["vendor parameters"][1] == "chat_template_kwargs, best_of"
    assert got["cache_control on a part"][1] == "messages[0].content[1].cache_control"
    assert got["a message name"][1] is None and got["penalties"][1] is None


def test_parameters_a_client_relies_on_are_refused_by_name(chat_gateway: Gateway, new_key: Keys) -> None:
    import openai

    sample = load_samples()[0]
    with sdk(chat_gateway, new_key()) as client:
        for param, value in [("modalities", ["text", "audio"]), ("audio", {"voice": "alloy", "format": "wav"})]:
            with pytest.raises(openai.BadRequestError) as info:
                client.chat.completions.create(model="tuwen", messages=[ask(sample)], **{param: value})
            assert info.value.code == "unsupported_parameter" and info.value.param == param


# -- an eval harness ----------------------------------------------------------------------------------------------
def test_an_eval_harness_prompt_is_answered_whole(long_gateway: tuple[Gateway, int], new_key: Keys) -> None:
    """VLMEvalKit's pattern: an ``sk-`` key, a long multiple-choice prompt with a hint, ``max_tokens=1024``.
    The answer runs to its own end (``stop``) past 64 tokens: nothing is cut, nothing refused."""
    gateway, expected = long_gateway
    token = new_key()
    assert token.startswith("sk-"), token
    with sdk(gateway, token) as client:
        answer = client.chat.completions.create(model="tuwen", messages=[eval_prompt()], max_tokens=1024,
                                                temperature=0)
    assert answer.choices[0].finish_reason == "stop"
    assert answer.usage is not None and answer.usage.completion_tokens == expected > 64


def eval_prompt() -> dict[str, Any]:
    sample = load_samples()[2]
    hint = "提示：请先仔细观察图片中的图形、颜色和数字，再从选项中选出最合适的一个，只回答选项的字母。" * 34
    text = f"{hint}\n问题：{sample.question}\n选项：\nA. 红色\nB. 蓝色\nC. 绿色\nD. 黄色\n答案："
    assert len(text) >= 1500
    return {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(sample.path.read_bytes())}},
                                        {"type": "text", "text": text}]}


@pytest.fixture(scope="module")
def long_gateway(pipeline_settings: Settings,
                 tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Gateway, int]]:
    """A tiny LLaVA with a 4,096-token context and (lively) random weights, whose end-of-sequence token is
    chosen so that the eval prompt's greedy answer ends by itself after more than 64 tokens (the first token that
    greedy decoding of that very prompt emits only after position 64). Yields the gateway and that length."""
    import uuid

    from tests.gateway.conftest import gateway_settings, start_gateway
    from tests.workers.test_families import build_llava_long
    from tuwen.workers.bench.process import WorkerProcess
    from tuwen.workers.engine.model import Item, Runtime

    path = tmp_path_factory.mktemp("llava-4k")
    build_llava_long(path, context=4096, gain=6.0)
    settings = pipeline_settings.model_copy(update={
        "model_path": path, "interactive_queue": f"long-i-{uuid.uuid4().hex[:6]}", "bulk_queue": "long-b",
        "max_new_tokens": 1024, "answer_cache": False})
    prompt = eval_prompt()
    picture = data_url_bytes(prompt["content"][0]["image_url"]["url"])
    item = Item(messages=({"role": "user", "content": [{"type": "image"}, {"type": "text",
                                                                           "text": prompt["content"][1]["text"]}]},),
                images=(picture,), max_new_tokens=200)
    runtime = Runtime(settings.model_copy(update={"torch_threads": 1}))
    tokens = runtime.answer_batch([item])[0].tokens
    late = next((i, t) for i, t in enumerate(tokens) if i > 64 and t not in tokens[:i])
    runtime.model.generation_config.eos_token_id = [runtime.model.generation_config.eos_token_id, late[1]]
    runtime.model.generation_config.save_pretrained(path)
    worker = WorkerProcess(settings, f"long-{uuid.uuid4().hex[:6]}@tests", path / "worker.log")
    worker.start()
    gateway = None
    try:
        worker.wait_ready(timeout=180)
        gateway = start_gateway(settings, gateway_settings())
        yield gateway, late[0]
    finally:
        if gateway is not None:
            gateway.stop()
        worker.stop()


def data_url_bytes(url: str) -> bytes:
    import base64

    return base64.b64decode(url.split(",", 1)[1])


# -- the documented snippets --------------------------------------------------------------------------------------
@pytest.mark.parametrize("client", ["LangChain", "LiteLLM", "async streaming"])
def test_the_documented_client_snippets_run_as_written(chat_gateway: Gateway, new_key: Keys,
                                                       monkeypatch: pytest.MonkeyPatch, client: str) -> None:
    doc = (ROOT / "docs" / "openai.md").read_text(encoding="utf-8")
    section = doc[doc.index("## Clients"):]
    block = re.search(rf"<!-- snippet: {client} -->\n```python\n(.*?)```", section, re.S)
    assert block is not None, client
    sample = load_samples()[4]
    assert sample.question in block.group(1)
    printed = run_doc_snippet(block.group(1), chat_gateway.url, new_key(), sample.path, monkeypatch)
    assert knows(printed, sample), printed
