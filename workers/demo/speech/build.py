"""Build the tiny Whisper-architecture demo speech model: tokenizer, feature extractor, model, generation config.

Everything is standard Hugging Face, so the saved directory loads like any Whisper checkpoint, with no
code of ours: ``AutoProcessor.from_pretrained(dir)`` gives a ``WhisperProcessor`` (a
``WhisperFeatureExtractor`` + a ``WhisperTokenizer``), ``AutoModelForSpeechSeq2Seq.from_pretrained(dir)``
a ``WhisperForConditionalGeneration``, and ``model.generate(input_features=...)`` +
``processor.batch_decode(ids, skip_special_tokens=True)`` transcribe.

What is smaller than whisper-tiny, and why:

* the tokenizer is Whisper's byte-level BPE, with merges that make each character of the demo's sentences
  one token (any other text still tokenises, byte by byte), and Whisper's special tokens laid out as
  in the real vocabulary (``<|startoftranscript|>`` then ``<|en|>``, ``<|zh|>``...), so
  ``WhisperTokenizer(language="zh", task="transcribe")`` writes the usual prefix
  ``<|startoftranscript|><|zh|><|transcribe|><|notimestamps|>``; no timestamp tokens;
* an 8 s window at 50 frames a second (hop 320 samples) instead of 30 s at 100: a spoken question is a few
  seconds, and 200 encoder positions instead of 1,500 keep training and inference cheap on a CPU;
* 3 encoder and 2 decoder layers of width 160 (about 2.0 M parameters, 4 MB in bfloat16).
"""

from __future__ import annotations

from pathlib import Path

from transformers import (
    GenerationConfig,
    WhisperConfig,
    WhisperFeatureExtractor,
    WhisperForConditionalGeneration,
    WhisperProcessor,
    WhisperTokenizer,
)

from tuwen.workers.demo.speech.corpus import characters

SAMPLE_RATE = 16_000
CHUNK_SECONDS = 8
HOP_LENGTH = 320
N_FFT = 512
N_MELS = 80
#: Encoder positions: frames / 2 (the second convolution has stride 2).
SOURCE_POSITIONS = CHUNK_SECONDS * SAMPLE_RATE // HOP_LENGTH // 2
TARGET_POSITIONS = 64
#: Whisper's special tokens in Whisper's order (languages: only en and zh, where Whisper has them).
SPECIALS = ("<|endoftext|>", "<|startoftranscript|>", "<|en|>", "<|zh|>", "<|translate|>", "<|transcribe|>",
            "<|startoflm|>", "<|startofprev|>", "<|nospeech|>", "<|notimestamps|>")
#: Characters every transcript may use beyond the corpus: punctuation, digits and ASCII letters.
EXTRA = "，。？！、：；（）“”0123456789+-=×÷"


def byte_alphabet() -> dict[int, str]:
    """GPT-2's byte-to-printable-character map, which Whisper's byte-level BPE uses."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def vocabulary() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Byte-level BPE vocabulary and merges: 256 bytes, then merges that join each character's bytes."""
    alphabet = byte_alphabet()
    vocab = {alphabet[b]: b for b in range(256)}
    merges: list[tuple[str, str]] = []
    for ch in characters() + list(EXTRA):
        pieces = [alphabet[b] for b in ch.encode("utf-8")]
        while len(pieces) > 1:  # join left to right: (b1 b2) then (b1b2 b3)
            pair = (pieces[0], pieces[1])
            joined = pieces[0] + pieces[1]
            if joined not in vocab:
                vocab[joined] = len(vocab)
                merges.append(pair)
            pieces = [joined, *pieces[2:]]
    return vocab, merges


def build_tokenizer() -> WhisperTokenizer:
    vocab, merges = vocabulary()
    for name in SPECIALS:  # after the text tokens, in Whisper's order
        vocab[name] = len(vocab)
    return WhisperTokenizer(vocab=vocab, merges=merges, language="zh", task="transcribe", predict_timestamps=False,
                            pad_token="<|endoftext|>", additional_special_tokens=list(SPECIALS[1:]),
                            model_max_length=TARGET_POSITIONS)


def build_processor() -> WhisperProcessor:
    features = WhisperFeatureExtractor(feature_size=N_MELS, sampling_rate=SAMPLE_RATE, hop_length=HOP_LENGTH,
                                       chunk_length=CHUNK_SECONDS, n_fft=N_FFT, return_attention_mask=False)
    return WhisperProcessor(feature_extractor=features, tokenizer=build_tokenizer())


def ids(tok: WhisperTokenizer) -> dict[str, int]:
    return {name: tok.convert_tokens_to_ids(name) for name in SPECIALS}


def build_model(processor: WhisperProcessor, seed: int = 0) -> WhisperForConditionalGeneration:
    """A fresh, randomly initialised tiny Whisper with a generation config Whisper's ``generate`` accepts."""
    import torch

    tok = processor.tokenizer
    special = ids(tok)
    eot, sot = special["<|endoftext|>"], special["<|startoftranscript|>"]
    config = WhisperConfig(
        vocab_size=len(tok), num_mel_bins=N_MELS, d_model=160, encoder_layers=3, decoder_layers=2,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=640, decoder_ffn_dim=640,
        max_source_positions=SOURCE_POSITIONS, max_target_positions=TARGET_POSITIONS,
        pad_token_id=eot, bos_token_id=eot, eos_token_id=eot, decoder_start_token_id=sot,
        begin_suppress_tokens=None, suppress_tokens=None, tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = WhisperForConditionalGeneration(config)
    model.generation_config = generation_config(tok)
    return model


def generation_config(tok: WhisperTokenizer) -> GenerationConfig:
    """Greedy, Whisper-style: ``<|startoftranscript|>``, the language (detected: zh is the only one), the
    task, ``<|notimestamps|>``, then the text up to ``<|endoftext|>``. ``task`` is set: with the language
    left to detection, Whisper's ``generate`` adds the task token only when a task is given."""
    special = ids(tok)
    eot = special["<|endoftext|>"]
    return GenerationConfig(
        decoder_start_token_id=special["<|startoftranscript|>"], bos_token_id=eot, eos_token_id=eot,
        pad_token_id=eot, do_sample=False, num_beams=1, max_length=TARGET_POSITIONS,
        is_multilingual=True, lang_to_id={"<|zh|>": special["<|zh|>"]},
        task_to_id={"transcribe": special["<|transcribe|>"], "translate": special["<|translate|>"]}, task="transcribe",
        no_timestamps_token_id=special["<|notimestamps|>"], prev_sot_token_id=special["<|startofprev|>"],
    )


def decoder_prompt(tok: WhisperTokenizer) -> list[int]:
    """What ``generate`` puts before the text: start, zh, transcribe, no timestamps."""
    special = ids(tok)
    return [special[t] for t in ("<|startoftranscript|>", "<|zh|>", "<|transcribe|>", "<|notimestamps|>")]


def build_untrained(path: Path | str, seed: int = 0) -> Path:
    """Write a randomly initialised checkpoint directory (what training starts from; tests load it)."""
    path = Path(path)
    processor = build_processor()
    model = build_model(processor, seed=seed)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path
