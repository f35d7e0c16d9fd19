"""The demo trainer runs end to end and saves a plain checkpoint the generic loaders read."""

from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(300)


def test_train_demo_smoke_saves_a_plain_llava_checkpoint(tmp_path: Path) -> None:
    from safetensors import safe_open
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from tuwen.workers.demo.train import train

    out = train(tmp_path / "ck", vision_steps=1, steps=3, batch_size=4, threads=1, eval_every=100, log=lambda _: None)
    model = AutoModelForImageTextToText.from_pretrained(out)
    processor = AutoProcessor.from_pretrained(out)
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert processor.tokenizer.padding_side == "left"
    with safe_open(str(out / "model.safetensors"), "pt") as weights:
        assert not [k for k in weights.keys() if "head" in k and "lm_head" not in k]  # aux heads dropped
    assert (out / "training_log.json").exists()
