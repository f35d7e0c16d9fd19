"""Log probabilities of a row's tokens: OpenAI's ``logprobs`` and ``top_logprobs``, per row.

They come from the distribution the row picks from: its logits after the penalties, ``logit_bias`` and the
grammar mask, divided by its temperature (greedy rows: not divided), then log-softmaxed. ``top_k``,
``top_p`` and ``min_p`` cut the draw, not these numbers (vLLM's ``processed_logprobs`` likewise). A token
the grammar forbids has no probability at all and is never listed among the alternatives.

Only rows that ask pay: one log-softmax over their lines of the step's logits and one ``topk``; other rows
are not touched. Each step's numbers are kept as token ids and floats (``Step``), and turned into OpenAI's
entries (text and exact bytes per token) only when they are handed out: streamed, or at the row's end.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Step:
    """One answer token's log probability and the likeliest alternatives at its step, likeliest first."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def measure(logits: torch.Tensor, temperatures: Sequence[float], picked: Sequence[int],
            tops: Sequence[int]) -> list[Step]:
    """The steps of the rows whose processed logits are ``logits`` (one line each): their picked tokens'
    log probabilities and their ``tops[i]`` likeliest alternatives (forbidden tokens left out)."""
    if any(t != 1.0 for t in temperatures):
        logits = logits / torch.tensor(temperatures, dtype=logits.dtype, device=logits.device)[:, None]
    # log p = logit - logsumexp: the numbers asked for, without a log-softmax of the whole vocabulary
    norm = torch.logsumexp(logits, dim=-1, keepdim=True)
    chosen = (logits.gather(1, torch.tensor(picked, device=logits.device)[:, None]) - norm)[:, 0].tolist()
    k = max(tops)
    values, ids = logits.topk(k, dim=-1) if k else (logits[:, :0], logits[:, :0].long())
    values_l, ids_l = (values - norm).tolist(), ids.tolist()
    steps = []
    for i, token in enumerate(picked):
        top = tuple((t, v) for t, v in zip(ids_l[i][:tops[i]], values_l[i][:tops[i]]) if v != float("-inf"))
        steps.append(Step(token, chosen[i], top))
    return steps


@functools.lru_cache(maxsize=8)
def _vocabulary(tokenizer: Any, size: int) -> tuple[bytes, ...]:
    """Every token's exact bytes (xgrammar decodes byte-level, byte-fallback and raw vocabularies alike);
    special tokens, which decode to nothing, as their own names."""
    import xgrammar as xgr

    decoded = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=size).decoded_vocab
    return tuple(raw or (tokenizer.convert_ids_to_tokens(i) or "").encode() for i, raw in enumerate(decoded))


class Entries:
    """Turns ``Step``s into OpenAI's entries: ``{token, logprob, bytes, top_logprobs: [{token, logprob,
    bytes}]}`` (``pipeline.schema.TokenLogprob``)."""

    def __init__(self, tokenizer: Any, size: int) -> None:
        self.vocabulary = _vocabulary(tokenizer, size)

    def one(self, token: int, logprob: float) -> dict[str, Any]:
        raw = self.vocabulary[token] if token < len(self.vocabulary) else b""
        return {"token": raw.decode("utf-8", errors="replace"), "logprob": logprob, "bytes": list(raw)}

    def __call__(self, steps: Sequence[Step]) -> list[dict[str, Any]]:
        return [{**self.one(s.token, s.logprob), "top_logprobs": [self.one(t, v) for t, v in s.top]} for s in steps]
