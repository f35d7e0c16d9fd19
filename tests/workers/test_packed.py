"""CPU workers' linear layers on oneDNN (``workers/engine/packed.py``): the same numbers to rounding, every
untied linear layer swapped, no extra memory, and the demo model's answers unchanged."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from tuwen.pipeline.settings import CpuLinear, Settings
from tuwen.workers.engine import packed
from tuwen.workers.demo import bundled_demo_model
from tuwen.workers.engine.model import Item, Runtime

SAMPLES = bundled_demo_model().parent / "samples"


def test_onednn_is_in_this_torch_build() -> None:
    assert packed.available(), "CPU workers would fall back to PyTorch's kernels"


@pytest.mark.parametrize("shape", [(1, 64), (16, 64), (3, 5, 64)])
def test_a_packed_layer_gives_linear_s_numbers(shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    linear = nn.Linear(64, 48)
    x = torch.randn(*shape)
    with torch.inference_mode():
        torch.testing.assert_close(packed.PackedLinear(linear)(x), linear(x), rtol=1e-5, atol=1e-5)


def test_pack_swaps_every_untied_linear_layer_without_growing_the_model() -> None:
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, tie_word_embeddings=True)
    model = LlamaForCausalLM(config).eval()
    linears = sum(type(m) is nn.Linear for m in model.modules())
    numel = sum(p.numel() for p in model.parameters())
    ids = torch.randint(0, 128, (2, 7))
    with torch.inference_mode():
        before = model(ids).logits
    assert packed.pack(model) == linears - 1  # the head shares the embedding table: left as it is
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight is model.model.embed_tokens.weight
    assert sum(isinstance(m, packed.PackedLinear) for m in model.modules()) == linears - 1
    assert sum(p.numel() for p in model.parameters()) == numel
    with torch.inference_mode():
        torch.testing.assert_close(model(ids).logits, before, rtol=1e-4, atol=1e-4)


def test_the_demo_model_answers_alike_on_both_kernels() -> None:
    """Known facts from the samples, checked on each kernel, and the same tokens from both."""
    entries = json.loads((SAMPLES / "samples.json").read_text("utf-8"))
    items = [Item((SAMPLES / e["file"]).read_bytes(), e["question"], 32) for e in entries]
    answers = {}
    for kernel in CpuLinear:
        rt = Runtime(Settings(model_path=bundled_demo_model(), torch_threads=1, max_new_tokens=32,
                              cpu_linear=kernel))
        rt.load()
        kinds = {type(m).__name__ for m in rt.model.modules()}
        assert ("PackedLinear" in kinds) == (kernel == CpuLinear.onednn)
        answers[kernel] = rt.answer_batch(items)
    for entry, onednn, aten in zip(entries, answers[CpuLinear.onednn], answers[CpuLinear.aten]):
        assert any(fact in (onednn.answer or "") for fact in entry["facts"]), (entry, onednn.answer)
        assert onednn.tokens == aten.tokens
