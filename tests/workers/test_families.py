"""Every model family tuwen supports, through the same runtime code, on tiny random checkpoints.

Each checkpoint is built offline from the family's config classes with its real processor classes,
saved, and loaded back by ``Runtime`` through the Auto classes. Random weights answer gibberish, so
the tests check tokens, counts and errors, never content.
"""

from __future__ import annotations

import io
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from tuwen.pipeline.client import Client
from tuwen.pipeline.localredis import LocalRedis
from tuwen.pipeline.schema import JobStatus
from tuwen.pipeline.settings import Quantization, Settings
from tests.conftest import make_settings
from tests.s3servers import S3Endpoint
from tests.workers.test_isolation import family_tokens, split_forms
from tuwen.workers.engine.families import apply_image_limits, pixels_per_token
from tuwen.workers.bench.process import WorkerProcess
from tuwen.workers.engine.model import Answer, Item, Runtime

pytestmark = pytest.mark.timeout(180)

QUESTIONS = ["图中是什么形状？", "这是什么颜色？", "数一数，图中一共有几个图形？", "描述这张图片。",
             "算一算，结果是多少？", "请你仔细看图，说一说图形涂的是什么颜色。"]
SIZES = [(64, 48), (120, 90), (200, 100), (30, 300), (96, 96), (250, 180)]


def picture(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.frombytes("RGB", (width, height), random.Random(seed).randbytes(width * height * 3))


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def items(max_new_tokens: int = 8) -> list[Item]:
    """Pictures of different sizes and aspect ratios with questions of different lengths."""
    return [Item(picture(w, h, i), q, max_new_tokens) for i, ((w, h), q) in enumerate(zip(SIZES, QUESTIONS))]


# -- tiny checkpoints -------------------------------------------------------------------------------
def _tiny_llama(tok: Any) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                       pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)


def _finish(model: Any, processor: Any, path: Path, eos: int | list[int], bos: int | None) -> None:
    gen = model.generation_config
    gen.pad_token_id, gen.eos_token_id, gen.bos_token_id = processor.tokenizer.pad_token_id, eos, bos
    gen.do_sample = False
    model.save_pretrained(path)
    processor.save_pretrained(path)


def build_llava(path: Path) -> None:
    """LLaVA-1.5: the demo model's recipe (CLIP ViT + projector + Llama, ``LlavaProcessor``)."""
    import torch

    from tuwen.workers.demo.build import build_model, build_processor

    processor = build_processor()
    torch.manual_seed(0)
    model = build_model(processor)
    tok = processor.tokenizer
    _finish(model, processor, path, tok.eos_token_id, tok.bos_token_id)


def build_llava_long(path: Path, context: int = 4096, gain: float = 1.0) -> None:
    """The LLaVA-1.5 recipe with a long context (the demo model's is 512 positions). ``gain`` scales the
    language model's matrices: at 1 a random model's greedy text settles on one token at once; at about 6
    it wanders through many tokens for hundreds of steps, as a trained model's answer does."""
    import torch

    from tuwen.workers.demo.build import build_model, build_processor

    processor = build_processor()
    torch.manual_seed(0)
    model = build_model(processor, context=context)
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if "language_model" in name and weight.dim() == 2:
                weight.mul_(gain)
    tok = processor.tokenizer
    _finish(model, processor, path, tok.eos_token_id, tok.bos_token_id)


def build_llava_next(path: Path) -> None:
    """LLaVA-NeXT: tiles from ``image_grid_pinpoints`` plus a base view, ``LlavaNextProcessor``."""
    import torch
    from transformers import (CLIPVisionConfig, LlavaNextConfig, LlavaNextForConditionalGeneration,
                              LlavaNextImageProcessor, LlavaNextProcessor)

    from tuwen.workers.demo.build import CHAT_TEMPLATE, build_tokenizer

    side, patch, pinpoints = 56, 14, [[56, 112], [112, 56], [112, 112], [56, 168], [168, 56]]
    tok = build_tokenizer()
    image_processor = LlavaNextImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side},
                                              image_grid_pinpoints=pinpoints)
    processor = LlavaNextProcessor(image_processor=image_processor, tokenizer=tok, patch_size=patch,
                                   vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                   chat_template=CHAT_TEMPLATE)
    vision = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                              image_size=side, patch_size=patch, projection_dim=64)
    config = LlavaNextConfig(vision_config=vision, text_config=_tiny_llama(tok), image_grid_pinpoints=pinpoints,
                             image_token_index=tok.convert_tokens_to_ids("<image>"), vision_feature_layer=-1,
                             vision_feature_select_strategy="default", image_seq_length=(side // patch) ** 2)
    torch.manual_seed(0)
    _finish(LlavaNextForConditionalGeneration(config), processor, path, tok.eos_token_id, tok.bos_token_id)


QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                 "<|image_pad|>", "<|video_pad|>"]

#: Qwen2-VL-Instruct's own chat template (the image placeholder comes where the message puts it).
QWEN_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def qwen_tokenizer() -> Any:
    """A character-level tokenizer with the special tokens Qwen's chat template and processor use."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    from tuwen.workers.demo.build import vocabulary

    chars = [c for c in vocabulary() if len(c) == 1]
    vocab = {t: i for i, t in enumerate(QWEN_SPECIALS + ["<unk>"] + chars)}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", fuse_unk=False))
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   unk_token="<unk>", additional_special_tokens=QWEN_SPECIALS[1:],
                                   padding_side="left", model_max_length=4096)


def build_qwen(path: Path, v25: bool) -> None:
    """Qwen2-VL / Qwen2.5-VL: dynamic resolution, M-RoPE (``sum(mrope_section)`` = head_dim / 2)."""
    import torch
    import transformers as tf

    tok = qwen_tokenizer()
    ids = tok.convert_tokens_to_ids
    #: The checkpoint's own range: 4 to 64 image tokens of 28×28 pixels.
    image_processor = tf.Qwen2VLImageProcessor(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 64)
    processor_class = tf.Qwen2_5_VLProcessor if v25 else tf.Qwen2VLProcessor
    processor = processor_class(image_processor=image_processor, tokenizer=tok,
                                video_processor=tf.Qwen2VLVideoProcessor(), chat_template=QWEN_CHAT_TEMPLATE)
    text = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=4096, bos_token_id=None,
                eos_token_id=ids("<|im_end|>"), pad_token_id=ids("<|endoftext|>"),
                rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]})
    if v25:
        vision: dict[str, Any] = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=4, out_hidden_size=64,
                                      window_size=56, fullatt_block_indexes=[1])
    else:
        vision = dict(depth=2, embed_dim=64, hidden_size=64, num_heads=4, mlp_ratio=2)
    config_class = tf.Qwen2_5_VLConfig if v25 else tf.Qwen2VLConfig
    config = config_class(text_config=text, vision_config=vision, image_token_id=ids("<|image_pad|>"),
                          video_token_id=ids("<|video_pad|>"), vision_start_token_id=ids("<|vision_start|>"),
                          vision_end_token_id=ids("<|vision_end|>"))
    model_class = tf.Qwen2_5_VLForConditionalGeneration if v25 else tf.Qwen2VLForConditionalGeneration
    torch.manual_seed(0)
    _finish(model_class(config), processor, path, [ids("<|im_end|>"), ids("<|endoftext|>")], None)


@dataclass(frozen=True)
class Family:
    name: str
    build: Callable[[Path], None]
    model_class: str
    processor_class: str
    #: True when the image processor resizes dynamically (token count follows the picture's size).
    dynamic: bool


FAMILIES = [
    Family("llava", build_llava, "LlavaForConditionalGeneration", "LlavaProcessor", False),
    Family("llava_next", build_llava_next, "LlavaNextForConditionalGeneration", "LlavaNextProcessor", False),
    Family("qwen2_vl", lambda p: build_qwen(p, v25=False), "Qwen2VLForConditionalGeneration", "Qwen2VLProcessor",
           True),
    Family("qwen2_5_vl", lambda p: build_qwen(p, v25=True), "Qwen2_5_VLForConditionalGeneration",
           "Qwen2_5_VLProcessor", True),
]


def _have(family: str) -> bool:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    return family in CONFIG_MAPPING_NAMES


@dataclass(frozen=True)
class Checkpoint:
    family: Family
    path: Path


@pytest.fixture(scope="module", params=FAMILIES, ids=lambda f: f.name)
def checkpoint(request: pytest.FixtureRequest, tiny_checkpoint: Callable[[str], Path]) -> Checkpoint:
    family: Family = request.param
    if not _have(family.name):
        pytest.skip(f"this transformers has no {family.name}")
    return Checkpoint(family, tiny_checkpoint(family.name))


@pytest.fixture(scope="module")
def family_runtime(checkpoint: Checkpoint) -> Runtime:
    """The family's checkpoint loaded once (fp32 on CPU); named apart from conftest's demo ``runtime``."""
    rt = Runtime(Settings(model_path=checkpoint.path, torch_threads=1, max_new_tokens=8))
    rt.load()
    return rt


def encode(rt: Runtime, img: Image.Image) -> tuple[int, int]:
    """(image placeholder tokens, all prompt tokens) the runtime's prompt gets for ``img``."""
    processor = rt.processor
    prompt = processor.apply_chat_template(rt.messages("图中有什么？"), add_generation_prompt=True)
    ids = processor(images=[img], text=[prompt], return_tensors="pt")["input_ids"]
    return int((ids == processor.image_token_id).sum()), int(ids.shape[1])


def image_tokens(rt: Runtime, img: Image.Image) -> int:
    return encode(rt, img)[0]


# -- the runtime, per family ------------------------------------------------------------------------
def test_loads_through_auto_classes(family_runtime: Runtime, checkpoint: Checkpoint) -> None:
    assert type(family_runtime.model).__name__ == checkpoint.family.model_class
    assert type(family_runtime.processor).__name__ == checkpoint.family.processor_class
    assert not type(family_runtime.processor.image_processor).__name__.endswith("Pil")  # the torchvision one
    assert family_runtime.processor.tokenizer.padding_side == "left"


def test_batched_is_token_identical_to_one_at_a_time(family_runtime: Runtime, checkpoint: Checkpoint) -> None:
    # Given pictures of different sizes and questions of different lengths
    batch = items()
    # When they are answered as one batch and one at a time
    batched = family_runtime.answer_batch(batch)
    single = [family_runtime.answer_batch([item])[0] for item in batch]
    # Then every answer is the same, token for token
    assert all(a.ok for a in batched + single), [a.error for a in batched + single]
    assert [a.tokens for a in batched] == [a.tokens for a in single]
    assert [a.prompt_tokens for a in batched] == [a.prompt_tokens for a in single]
    assert {a.batch_size for a in batched} == {len(batch)}
    assert sum(a.generated_tokens for a in batched) > 0
    if checkpoint.family.dynamic:  # the picture's size shows in the prompt length
        assert len({a.prompt_tokens - len(q) for a, q in zip(batched, QUESTIONS)}) > 1


def test_split_special_tokens_stay_text_and_fail_no_batch_mate(family_runtime: Runtime) -> None:
    """Issue 21: each of the family's picture, role, padding and end tokens, split across parts, turns, a
    system prompt or the assistant prefix, stays text: the ids hold exactly the special tokens the
    template wrote, and a group mixing such rows with plain ones answers all of them as alone."""
    prompts = family_runtime.prompts
    tokens = family_tokens(prompts)
    assert getattr(family_runtime.processor, "image_token") in tokens and len(tokens) >= 3, tokens
    attacks = []
    for token in tokens:
        for name, messages in split_forms(token, "图中有什么？").items():
            prompt = prompts.render(messages)
            prompts.check(prompt, pictures=1)
            assert prompt.specials[family_runtime.processor.image_token] == 1, (token, name)
            attacks.append(messages)
    rng = random.Random(21)
    bad = [Item(messages=tuple(m), images=(picture(64, 48, i),), max_new_tokens=4)
           for i, m in enumerate(rng.sample(attacks, 5))]
    group = bad[:2] + items(4)[:3] + bad[2:]
    batched = family_runtime.answer_batch(group)
    single = [family_runtime.answer_batch([item])[0] for item in group]
    assert all(a.ok for a in batched), [a.error for a in batched]
    assert [a.tokens for a in batched] == [a.tokens for a in single]


def test_nf4_loads_and_generates(checkpoint: Checkpoint) -> None:
    import bitsandbytes as bnb

    rt = Runtime(Settings(model_path=checkpoint.path, quantization=Quantization.nf4, torch_threads=1,
                          max_new_tokens=6))
    answers = rt.answer_batch(items(6)[:3])
    assert all(a.ok for a in answers), [a.error for a in answers]
    assert sum(a.generated_tokens for a in answers) > 0
    quantized = [name for name, m in rt.model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(quantized) >= 14  # 7 projections × 2 language-model layers
    # only the language model's projections: vision encoder, projector / merger and lm_head stay as they are
    assert all(n.startswith("model.language_model.") for n in quantized), quantized
    assert rt.model_id.endswith(":nf4")


# -- image limits -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Limits:
    max_image_tokens: int
    min_image_tokens: int = 0


def test_huge_picture_is_bounded_to_the_configured_image_tokens(checkpoint: Checkpoint) -> None:
    # Given a freshly loaded runtime with tuwen's image limits applied
    rt = Runtime(Settings(model_path=checkpoint.path, torch_threads=1, max_new_tokens=2))
    huge = picture(4000, 3000)
    before = image_tokens(rt, huge)
    apply_image_limits(rt.processor, Limits(max_image_tokens=16))
    # When a 4000×3000 picture is asked about
    answer = rt.answer_batch([Item(huge, "图中有什么？")])[0]
    # Then it is answered with at most the configured number of image tokens
    assert answer.ok, answer.error
    tokens = image_tokens(rt, huge)
    if checkpoint.family.dynamic:
        assert before > 16 >= tokens > 0
    else:  # fixed resolution or tiles: bounded by the checkpoint, the same for a 10× smaller picture
        assert tokens == before == image_tokens(rt, picture(400, 300))
    assert answer.prompt_tokens == encode(rt, huge)[1]  # the runtime's prompt used the bounded count


def test_limits_cap_but_never_raise_the_checkpoint_range(checkpoint: Checkpoint) -> None:
    rt = Runtime(Settings(model_path=checkpoint.path, torch_threads=1))
    unit = pixels_per_token(rt.processor.image_processor)
    if not checkpoint.family.dynamic:
        assert unit is None
        return
    assert unit == 28 * 28
    huge, tiny = picture(4000, 3000), picture(20, 20)
    apply_image_limits(rt.processor, Limits(max_image_tokens=100_000))
    assert image_tokens(rt, huge) <= 64  # the checkpoint's own maximum stays
    apply_image_limits(rt.processor, Limits(max_image_tokens=32, min_image_tokens=16))
    assert 16 <= image_tokens(rt, tiny) <= image_tokens(rt, huge) <= 32
    apply_image_limits(rt.processor, Limits(max_image_tokens=8, min_image_tokens=50))  # min clipped to max / 2
    assert 4 <= image_tokens(rt, tiny) <= 8 and image_tokens(rt, huge) <= 8


def test_limits_also_reach_the_attributes_older_transformers_read() -> None:
    from types import SimpleNamespace

    # transformers 4.x Qwen2-VL image processors read ``min_pixels``/``max_pixels`` attributes
    image_processor = SimpleNamespace(patch_size=14, merge_size=2, min_pixels=3136, max_pixels=12845056,
                                      size={"min_pixels": 3136, "max_pixels": 12845056})
    apply_image_limits(SimpleNamespace(image_processor=image_processor), Limits(1280, 256))
    assert (image_processor.min_pixels, image_processor.max_pixels) == (256 * 784, 1280 * 784)
    assert image_processor.size == {"min_pixels": 256 * 784, "max_pixels": 1280 * 784}


# -- a real worker on a non-LLaVA family ---------------------------------------------------------------
@pytest.fixture(scope="module")
def qwen_checkpoint(tiny_checkpoint: Callable[[str], Path]) -> Path:
    if not _have("qwen2_vl"):
        pytest.skip("this transformers has no qwen2_vl")
    return tiny_checkpoint("qwen2_vl")


@pytest.fixture
def qwen_worker(redis_server: LocalRedis, s3: S3Endpoint, qwen_checkpoint: Path,
                tmp_path: Path) -> Iterator[tuple[WorkerProcess, Settings]]:
    settings = make_settings(redis_server.url, s3, model_path=qwen_checkpoint, interactive_queue="fam-i",
                             bulk_queue="fam-b", max_new_tokens=8)
    proc = WorkerProcess(settings, "families@tests", tmp_path / "worker.log")
    proc.start()
    try:
        proc.wait_ready(timeout=120)
        yield proc, settings
    finally:
        proc.stop()


@pytest.mark.integration
def test_worker_answers_qwen2_vl_jobs_like_the_runtime(qwen_worker: tuple[WorkerProcess, Settings],
                                                      qwen_checkpoint: Path) -> None:
    _, settings = qwen_worker
    pictures = [png(picture(w, h, i)) for i, (w, h) in enumerate(SIZES)]
    client = Client(settings)
    try:
        # Given a burst of jobs with pictures of different sizes, through the queue to a Qwen2-VL worker
        jobs = [client.submit(img, q) for img, q in zip(pictures, QUESTIONS)]
        # When the worker has answered them
        results = client.wait_many([j.id for j in jobs], timeout=120)
    finally:
        client.close()
    # Then every job succeeded with the tokens the runtime gives each one alone
    ordered = [results[j.id] for j in jobs]
    assert all(r.status == JobStatus.succeeded for r in ordered), [r.error for r in ordered]
    rt = Runtime(Settings(model_path=qwen_checkpoint, torch_threads=1, max_new_tokens=8))
    alone: list[Answer] = [rt.answer_batch([Item(img, q)])[0] for img, q in zip(pictures, QUESTIONS)]
    assert [r.answer for r in ordered] == [a.answer for a in alone]
    assert [(r.prompt_tokens, r.generated_tokens) for r in ordered] == [(a.prompt_tokens, a.generated_tokens)
                                                                         for a in alone]
    assert all(r.model_id == rt.model_id for r in ordered)
    assert max(r.batch_size or 0 for r in ordered) > 1


def test_the_announced_picture_side_is_the_size_the_processor_brings_a_picture_to(checkpoint: Checkpoint) -> None:
    # Given the family's runtime and the side it announces (PDF pages are rendered at it)
    rt = Runtime(Settings(model_path=checkpoint.path, torch_threads=1))
    side, image_processor = rt.picture_side, rt.processor.image_processor
    assert side is not None and side >= 28
    # When a big square picture goes through the processor
    out = image_processor(images=[picture(2000, 2000)], return_tensors="pt")
    if checkpoint.family.dynamic:  # Then it comes out about side × side (to a merged patch)
        unit = image_processor.patch_size * image_processor.merge_size
        _, h, w = (int(x) for x in out["image_grid_thw"][0])
        assert abs(h * image_processor.patch_size - side) <= unit and abs(w * image_processor.patch_size - side) <= unit
    elif getattr(image_processor, "image_grid_pinpoints", None):  # tiles: the largest grid bounds what it sees
        crop = max(_crop(image_processor))
        tiles = out["pixel_values"].shape[1] - 1  # past the whole picture's own tile
        assert side % crop == 0 and 0 < tiles and tiles * crop ** 2 <= side ** 2
    else:  # a fixed size: exactly it
        assert max(out["pixel_values"].shape[-2:]) == side


def _crop(image_processor: Any) -> tuple[int, int]:
    size = image_processor.crop_size
    size = size if isinstance(size, dict) else dict(size)
    return int(size["height"]), int(size["width"])
