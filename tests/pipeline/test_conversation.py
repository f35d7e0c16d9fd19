"""Preparing conversation jobs against real Redis and S3: shapes, limits, pictures by key per owner."""

from __future__ import annotations

import pytest

from tuwen.pipeline.client import Client
from tuwen.pipeline.conversation import StoredImage, Turn, prepare_conversation
from tuwen.pipeline.errors import InvalidInput
from tuwen.pipeline.schema import ImagePart, Role
from tuwen.workers.demo import bundled_demo_model

pytestmark = pytest.mark.integration
PICTURE = (bundled_demo_model().parent / "samples" / "colour-photo.png").read_bytes()
OTHER = (bundled_demo_model().parent / "samples" / "shape-photo.png").read_bytes()


def refused(client: Client, turns: list[Turn], **kw: object) -> str:
    with pytest.raises(InvalidInput) as info:
        prepare_conversation(client, turns, kw.pop("params", {}), **kw)  # type: ignore[arg-type]
    return info.value.code


def test_a_conversation_becomes_a_job_with_stored_pictures(client: Client) -> None:
    turns = [Turn("system", ["你是一位老师。"]), Turn("user", [PICTURE, "这是什么颜色？\r\n"]),
             Turn("assistant", ["蓝色。"]), Turn("user", [OTHER, "这张呢？"])]
    job = prepare_conversation(client, turns, {"max_new_tokens": 16, "temperature": 0.7, "seed": 3},
                               owner="alice", stream=True)
    assert [m.role for m in job.messages] == [Role.system, Role.user, Role.assistant, Role.user]
    assert len(job.image_keys) == 2 and all(client.images.exists(k) for k in job.image_keys)
    assert job.question == "这张呢？" and job.messages[1].text == "这是什么颜色？"
    assert isinstance(job.messages[1].content[0], ImagePart)
    assert job.stream and job.params.seed == 3 and job.owner == "alice"


def test_pictures_by_key_only_for_the_owner_who_stored_them(client: Client) -> None:
    key = client.store_image(PICTURE, "alice")
    mine = prepare_conversation(client, [Turn("user", [StoredImage(key), "什么颜色？"])], {}, owner="alice")
    assert mine.image_keys == [key]
    theirs = refused(client, [Turn("user", [StoredImage(key), "什么颜色？"])], owner="mallory")
    missing = refused(client, [Turn("user", [StoredImage("images/" + "0" * 64), "什么颜色？"])], owner="mallory")
    assert theirs == missing == "image_not_found"


@pytest.mark.parametrize("turns,code", [
    ([], "invalid_messages"),
    ([Turn("robot", ["a"])], "invalid_messages"),
    ([Turn("assistant", [PICTURE, "看"]), Turn("user", ["c"])], "invalid_messages"),
    ([Turn("user", ["\u200b\ufeff "])], "empty_question"),
    ([Turn("system", [""]), Turn("user", [""])], "empty_question"),
    ([Turn("user", [b"not a picture", "什么？"])], "unsupported_image_format"),
    ([Turn("user", ["问" * 200_001])], "conversation_too_long"),
])
def test_bad_conversations_get_codes_and_store_nothing(client: Client, turns: list[Turn], code: str) -> None:
    assert refused(client, turns) == code


@pytest.mark.parametrize("name,turns", [
    ("a system message after the first turn", [Turn("user", ["a"]), Turn("system", ["b"]), Turn("user", ["c"])]),
    ("an assistant message last (a prefill to continue)", [Turn("user", [PICTURE, "什么颜色？"]),
                                                            Turn("assistant", ["图形是"])]),
    ("only an assistant message", [Turn("assistant", ["你好"])]),
    ("a picture with no text", [Turn("user", [PICTURE])]),
    ("a picture with only invisible text", [Turn("user", [PICTURE, "\u200b\ufeff "])]),
    ("an empty turn", [Turn("user", [PICTURE, "什么颜色？"]), Turn("assistant", []), Turn("user", ["再说一遍。"])]),
    ("a 2,000-character question", [Turn("user", [PICTURE, "问" * 2000])]),
])
def test_shapes_openai_takes_are_jobs(client: Client, name: str, turns: list[Turn]) -> None:
    """Issue 22: conversation shapes OpenAI accepts were refused; the model's template decides now."""
    job = prepare_conversation(client, turns, {})
    assert len(job.messages) == len(turns), name
    assert job.continues == (turns[-1].role == "assistant"), name


def test_limits_on_pictures_text_and_params(client: Client) -> None:
    many = [Turn("user", [PICTURE] * (client.settings.max_images_per_job + 1) + ["什么颜色？"])]
    assert refused(client, many) == "too_many_images"
    long = [Turn("user", ["历史" * 100_001]), Turn("assistant", ["好"]), Turn("user", ["什么？"])]
    assert refused(client, long) == "conversation_too_long"
    assert refused(client, [Turn("user", ["什么？"])], params={"temperature": 3}) == "invalid_params"
    assert refused(client, [Turn("user", ["什么？"])], params={"stop": ["a"] * 5}) == "invalid_params"
    assert refused(client, [Turn("user", ["什么？"])], params={"top_logprobs": 2}) == "invalid_params"
