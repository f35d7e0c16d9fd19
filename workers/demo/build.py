"""Build the tiny LLaVA-1.5-architecture demo model, its character tokenizer and its processor.

Everything here is standard Hugging Face: ``CLIPVisionConfig`` + ``LlamaConfig`` -> ``LlavaConfig``,
a ``tokenizers`` character-level tokenizer wrapped as ``PreTrainedTokenizerFast``, and
``CLIPImageProcessor`` + ``LlavaProcessor`` with a chat template. The saved directory loads with
``AutoProcessor`` / ``AutoModelForImageTextToText`` like any llava-hf checkpoint.
"""

from __future__ import annotations

from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from tuwen.workers.demo.scenes import QUESTIONS, SHAPES, COLOURS

IMAGE_SIZE = 96
PATCH_SIZE = 12
IMAGE_SEQ_LENGTH = (IMAGE_SIZE // PATCH_SIZE) ** 2
SPECIALS = ("<pad>", "<s>", "</s>", "<unk>", "<image>")

#: The LLaVA-1.5 conversation format ("USER: <image>\n... ASSISTANT:"), as in llava-hf checkpoints.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] if message['content'] is string "
    "else message['content'][0]['text'] }}{{ ' ' }}"
    "{% else %}{{ message['role'].upper() + ': ' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] if item['type'] == 'image' %}{{ '<image>\n' }}{% endfor %}"
    "{% for item in message['content'] if item['type'] == 'text' %}{{ item['text'] }}{% endfor %}{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ ' ' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

# Common characters beyond the demo's own phrases, so everyday questions tokenise to something.
_COMMON = (
    "的一是不了人我在有他这中大来上个国到说们为子和你地出道也时年得就那要下以生会自着去之过家学对可她里后"
    "小么心多天而能好都然没日于起还发成事只作当想看文无开手十用主行方又如前所本见经头面公同三已老从动两长"
    "知民样现分将外但身些与高意进把法此实回二理美点月明其种声全工己话儿者向情部正名定女问力机给等几很业最"
    "间新什打便位因重被走电四第门相次东政海口使教西再平真听世气信北少关并内加化由却代军产入先山五太水万市"
    "眼体别处总才场师书比住员九笑性通目华报立马命张活难神数件安表原车白应路期叫死常提感金何更反合放做系计"
    "六七八零百千颜色形状图片题目答案请问算式等于加减乘除多少哪些几个一共红黄蓝绿紫橙黑灰粉棕圆角星方长正"
    "三角五边六画写读字词句段课练习作业考试老师同学校班级年级数学语文英科小朋友左右上下中间里外大小高低远近"
    "是否对错吗呢吧啊呀哦嗯这那哪谁怎么为什么因为所以如果虽然但是可以应该需要描述说明解释看到发现找出选择"
)


def vocabulary() -> list[str]:
    """Special tokens, then printable ASCII, then every character the demo task and common text use."""
    chars: list[str] = []
    seen: set[str] = set()
    corpus = [chr(c) for c in range(32, 127)] + list("，。？！：；、“”‘’（）《》【】…—·＝＋－×÷□\n")
    corpus += list(_COMMON) + list("".join(SHAPES) + "".join(COLOURS))
    corpus += [ch for phrases in QUESTIONS.values() for p in phrases for ch in p]
    corpus += list("图中是有个的这一道口算题：形")
    for ch in corpus:
        if ch not in seen and ch not in "{}":
            seen.add(ch)
            chars.append(ch)
    chars += ["{", "}"]
    return list(SPECIALS) + chars


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer: one token per character, special tokens matched whole."""
    from tokenizers import Tokenizer, decoders, models

    vocab = {tok: i for i, tok in enumerate(vocabulary())}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", fuse_unk=False))
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>"},
        padding_side="left",
        model_max_length=512,
    )
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return tok


def build_processor(image_size: int = IMAGE_SIZE, patch_size: int = PATCH_SIZE) -> LlavaProcessor:
    """The demo's processor; other picture geometry for bench checkpoints (LLaVA-1.5's is 336 / 14)."""
    image_processor = CLIPImageProcessor(
        size={"height": image_size, "width": image_size},
        do_center_crop=False,
        crop_size={"height": image_size, "width": image_size},
        do_convert_rgb=True,
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=build_tokenizer(),
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )


def build_model(processor: LlavaProcessor, seed: int = 0, context: int = 512) -> LlavaForConditionalGeneration:
    """A fresh, randomly initialised tiny LLaVA-1.5 (CLIP ViT + MLP projector + Llama) with ``context``
    positions."""
    import torch

    tok = processor.tokenizer
    vision = CLIPVisionConfig(
        hidden_size=192, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
        image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, projection_dim=192,
    )
    text = LlamaConfig(
        vocab_size=len(tok), hidden_size=256, intermediate_size=768, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=context,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        tie_word_embeddings=True,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        image_seq_length=IMAGE_SEQ_LENGTH,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    gen = model.generation_config
    gen.pad_token_id, gen.bos_token_id, gen.eos_token_id = tok.pad_token_id, tok.bos_token_id, tok.eos_token_id
    gen.do_sample = False
    gen.max_new_tokens = 48
    return model
