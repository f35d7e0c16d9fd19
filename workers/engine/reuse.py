"""Each picture seen once per worker: the encoder cache, the prefix cache, and how a join uses them.

* **Encoder cache.** A picture's projected features (the vision tower and projector's output, what the
  model scatters into its image tokens) are kept by picture digest, bounded in bytes, least recently used
  out first. The model gets them through its ``mm_encoder_outputs`` argument instead of pixels.
* **Prefix cache.** The key/value cache of a row's *prefix*, every token up to the end of its last
  picture (the system prompt, earlier turns, the pictures), is kept by the digest of those tokens and
  pictures, bounded in bytes too. Rows of one join with the same prefix share one prefill of it
  (``policy.shared_prefill`` groups them); a later row finds it here and prefills only its question.

Both are **per owner**: every key starts with the job's owner. A key shared across owners would let owner
B learn, from a faster first token, that someone asked about B's picture before (the answer cache made the
same choice, ``workers.serve.cache``). Two owners sending one picture pay for it twice.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch


def picture_digest(image: Any) -> bytes:
    """A digest of a decoded picture's pixels (mode, size and bytes): equal pictures, equal features."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{image.mode}:{image.size}".encode())
    h.update(image.tobytes())
    return h.digest()


def scoped(scope: str, *parts: bytes) -> bytes:
    """A cache key: the owner's, never shared with another owner's (see the module docstring)."""
    h = hashlib.blake2b(scope.encode(), digest_size=16)
    for part in parts:
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h.digest()


class Lru:
    """Values by key, bounded in bytes, least recently used out first; counts hits, misses and evictions.
    A value larger than the whole bound is not kept."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.used = 0
        self.hits = self.misses = self.evictions = 0
        self._items: OrderedDict[bytes, tuple[Any, int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: bytes) -> bool:
        """Whether ``key`` is kept (neither counted nor refreshed)."""
        return key in self._items

    def get(self, key: bytes) -> Any | None:
        item = self._items.get(key)
        if item is None:
            self.misses += 1
            return None
        self.hits += 1
        self._items.move_to_end(key)
        return item[0]

    def put(self, key: bytes, value: Any, size: int) -> None:
        if key in self._items or size > self.capacity:
            return
        while self.used + size > self.capacity:
            _, (_, gone) = self._items.popitem(last=False)
            self.used -= gone
            self.evictions += 1
        self._items[key] = (value, size)
        self.used += size

    def clear(self) -> None:
        self._items.clear()
        self.used = 0


def nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@dataclass
class Prefix:
    """A prefix's key/value cache: per layer ``(keys, values)`` of shape (1, heads, tokens, head dim)."""

    layers: list[tuple[torch.Tensor, torch.Tensor]]
    tokens: int


class Reuse:
    """The worker's encoder and prefix caches (one per model, owned by the runtime, shared by its engines)."""

    def __init__(self, model: Any, encoder_bytes: int, prefix_bytes: int) -> None:
        self.model = model
        self.features = Lru(encoder_bytes)
        self.prefixes = Lru(prefix_bytes)
        config = model.config
        self.image_token_id = getattr(config, "image_token_id", None)
        if self.image_token_id is None:
            self.image_token_id = getattr(config, "image_token_index", None)
        #: Rows that found their prefix (cached, or a join-mate's), and rows that prefilled it.
        self.prefix_hits = self.prefix_misses = 0

    @cached_property
    def applies(self) -> bool:
        """The model takes pictures as ``mm_encoder_outputs``, names its image token, and every layer of its
        cache is a full-attention one (a sliding window's cache could not be copied as a prefix)."""
        from tuwen.workers.engine.kvcache import RoomyLayer, roomy_cache

        layers = roomy_cache(self.model.config).layers
        return (self.image_token_id is not None and hasattr(self.model, "get_image_features")
                and all(type(layer) is RoomyLayer for layer in layers))

    def clear(self) -> None:
        """Let go of every cached tensor (out of memory)."""
        self.features.clear()
        self.prefixes.clear()

    # -- keys ------------------------------------------------------------------------------------------
    def picture_keys(self, rows: Sequence[Any]) -> list[bytes]:
        """The encoder-cache key of every picture of ``rows``, in prompt order."""
        keys = []
        for row in rows:
            digests = row.digests or tuple(picture_digest(img) for img in row.images)
            keys += [scoped(row.scope, d) for d in digests]
        return keys

    def prefix_keys(self, rows: Sequence[Any], ids: torch.Tensor, mask: torch.Tensor,
                    pictures: list[bytes]) -> list[tuple[bytes, int] | None]:
        """Per row, its prefix's key and length in tokens (up to the end of its last picture), or None for a
        row without pictures (or without a token after them). ``pictures``: ``picture_keys(rows)``."""
        out: list[tuple[bytes, int] | None] = []
        lengths = mask.sum(-1).tolist()
        width = int(ids.shape[1])
        ids_cpu = ids.cpu()
        at = 0
        for i, row in enumerate(rows):
            real = ids_cpu[i, width - int(lengths[i]):]
            where = (real == self.image_token_id).nonzero()
            count = len(row.images)
            mine, at = pictures[at:at + count], at + count
            if not len(where) or int(where[-1]) + 1 >= len(real):
                out.append(None)
                continue
            end = int(where[-1]) + 1
            out.append((scoped(row.scope, real[:end].numpy().tobytes(), *mine), end))
        return out

    # -- features --------------------------------------------------------------------------------------
    def encoder_outputs(self, keys: list[bytes], inputs: dict[str, Any], wanted: list[int]) -> Any:
        """The model's ``mm_encoder_outputs`` for pictures ``wanted`` (indexes into the join's pictures, in
        prompt order): cached features, the others computed together (a picture twice in one join, once)."""
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        found: dict[bytes, torch.Tensor] = {}
        missing: list[int] = []
        for i in wanted:
            key = keys[i]
            if key in found or any(keys[j] == key for j in missing):
                continue
            value = self.features.get(key)
            if value is None:
                missing.append(i)
            else:
                found[key] = value
        if missing:
            with torch.inference_mode():
                out = self.model.get_image_features(**picture_inputs(inputs, missing))
            for i, feature in zip(missing, out.pooler_output):
                feature = feature.detach().clone()  # a view would keep the whole batch's tensor alive
                found[keys[i]] = feature
                self.features.put(keys[i], feature, nbytes(feature))
        return {"image": BaseModelOutputWithPooling(pooler_output=[found[keys[i]] for i in wanted])}


def picture_inputs(inputs: dict[str, Any], chosen: list[int]) -> dict[str, Any]:
    """The processor's picture tensors for pictures ``chosen`` only (Qwen-VL's patches are one flat tensor,
    split by ``image_grid_thw``; the LLaVA families' have a picture per first index)."""
    pixels = inputs["pixel_values"]
    if "image_grid_thw" in inputs:
        grid = inputs["image_grid_thw"]
        sizes = grid.prod(-1).tolist()
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        return {"pixel_values": torch.cat([pixels[starts[i]:starts[i] + sizes[i]] for i in chosen]),
                "image_grid_thw": grid[chosen]}
    out = {"pixel_values": pixels[chosen]}
    if "image_sizes" in inputs:
        out["image_sizes"] = inputs["image_sizes"][chosen]
    return out


class Prefill:
    """One join's prefill with reuse: pictures from the encoder cache, rows sharing a prefix grouped (the
    prefix prefilled once, or found cached, then each row's question on a copy of it), the other rows
    prefilled whole together. ``parts`` are (row indexes, cache, last logits, attention mask) to join."""

    def __init__(self, reuse: Reuse, rows: Sequence[Any], inputs: dict[str, Any], positions: torch.Tensor) -> None:
        self.reuse, self.model = reuse, reuse.model
        self.inputs, self.positions = inputs, positions
        self.ids, self.mask = inputs["input_ids"], inputs["attention_mask"]
        self.width = int(self.ids.shape[1])
        self.lengths = [int(n) for n in self.mask.sum(-1).tolist()]
        self.keys = reuse.picture_keys(rows)
        counts = [len(r.images) for r in rows]
        self.pictures = [list(range(sum(counts[:i]), sum(counts[:i + 1]))) for i in range(len(rows))]
        self.prefixes = reuse.prefix_keys(rows, self.ids, self.mask, self.keys)

    def parts(self) -> list[tuple[list[int], Any, torch.Tensor, torch.Tensor]]:
        from tuwen.workers.engine.policy import shared_prefill

        plain, groups = shared_prefill([p[0] if p else None for p in self.prefixes], self.reuse.prefixes)
        parts = [(plain, *self._whole(plain))] if plain else []
        return parts + [(group, *self._shared(group)) for group in groups]

    def _run(self, **kwargs: Any) -> Any:
        with torch.inference_mode():
            return self.model(use_cache=True, logits_to_keep=1, **kwargs)

    def _rows(self, index: list[int]) -> torch.Tensor:
        sel = torch.tensor(index, dtype=torch.long, device=self.positions.device)
        return self.positions[:, sel] if self.positions.ndim == 3 else self.positions[sel]

    def _features(self, index: list[int]) -> Any:
        wanted = [p for i in index for p in self.pictures[i]]
        return self.reuse.encoder_outputs(self.keys, self.inputs, wanted) if wanted else None

    def _whole(self, index: list[int]) -> tuple[Any, torch.Tensor, torch.Tensor]:
        """Rows prefilled whole, left-padded as in a plain join (columns no row needs dropped). The prefix of
        each (its first tokens' cache: attention is causal) is kept for the rows after it."""
        from tuwen.workers.engine.kvcache import roomy_cache

        start = self.width - max(self.lengths[i] for i in index)
        sel = torch.tensor(index, dtype=torch.long, device=self.ids.device)
        mask = self.mask[sel, start:]
        out = self._run(input_ids=self.ids[sel, start:], attention_mask=mask,
                        position_ids=self._rows(index)[..., start:], cache=roomy_cache(self.model.config),
                        mm_encoder_outputs=self._features(index))
        for row, i in enumerate(index):
            prefix = self.prefixes[i]
            if prefix is not None:
                self.reuse.prefix_misses += 1
                cols = slice(self.width - self.lengths[i] - start, self.width - self.lengths[i] - start + prefix[1])
                self._keep(prefix, [(layer.keys[row:row + 1, :, cols], layer.values[row:row + 1, :, cols])
                                    for layer in out.cache.layers])
        return out.cache, out.logits[:, -1, :], mask

    def _keep(self, prefix: tuple[bytes, int], layers: list[tuple[torch.Tensor, torch.Tensor]]) -> Prefix:
        """Keep a prefix's cache (copies: the running batch's buffers change) if the bound allows."""
        key, tokens = prefix
        size = sum(nbytes(k, v) for k, v in layers)
        if size > self.reuse.prefixes.capacity or key in self.reuse.prefixes:
            return Prefix(layers, tokens)
        entry = Prefix([(k.clone(), v.clone()) for k, v in layers], tokens)
        self.reuse.prefixes.put(key, entry, size)
        return entry

    def _shared(self, index: list[int]) -> tuple[Any, torch.Tensor, torch.Tensor]:
        """Rows with one prefix: the prefix's cache (found, or prefilled from the first row), copied into
        each row, then every row's own tokens after it, left-padded among themselves: the padding sits
        between the prefix and the tokens (masked; positions are explicit, so nothing moves)."""
        entry = self._prefix(index[0], len(index))
        tail = [self.lengths[i] - entry.tokens for i in index]
        most = max(tail)
        sel = torch.tensor(index, dtype=torch.long, device=self.ids.device)
        mask = self.mask[sel, self.width - most:].clone()
        for row, n in enumerate(tail):
            mask[row, :most - n] = 0
        mask = torch.cat([mask.new_ones((len(index), entry.tokens)), mask], dim=1)
        out = self._run(input_ids=self.ids[sel, self.width - most:], attention_mask=mask,
                        position_ids=self._rows(index)[..., self.width - most:], cache=self._copies(entry, len(index)))
        return out.cache, out.logits[:, -1, :], mask

    def _prefix(self, row: int, sharing: int) -> Prefix:
        """The prefix of ``row`` (and of ``sharing`` - 1 rows more): cached, or prefilled now from ``row``."""
        from tuwen.workers.engine.kvcache import roomy_cache

        prefix = self.prefixes[row]
        assert prefix is not None
        entry = self.reuse.prefixes.get(prefix[0])
        if entry is not None:
            self.reuse.prefix_hits += sharing
            return entry  # type: ignore[no-any-return]
        self.reuse.prefix_hits += sharing - 1
        self.reuse.prefix_misses += 1
        start, tokens = self.width - self.lengths[row], prefix[1]
        out = self._run(input_ids=self.ids[row:row + 1, start:start + tokens],
                        attention_mask=self.mask.new_ones((1, tokens)),
                        position_ids=self._rows([row])[..., start:start + tokens],
                        cache=roomy_cache(self.model.config), mm_encoder_outputs=self._features([row]))
        return self._keep(prefix, [(layer.keys, layer.values) for layer in out.cache.layers])

    def _copies(self, entry: Prefix, rows: int) -> Any:
        """A cache whose ``rows`` rows are the prefix (views: the next update copies them into a buffer with
        room)."""
        from tuwen.workers.engine.kvcache import roomy_cache

        cache = roomy_cache(self.model.config)
        for layer, (keys, values) in zip(cache.layers, entry.layers):
            layer.lazy_initialization(keys, values)
            layer.hold(keys.expand(rows, -1, -1, -1), values.expand(rows, -1, -1, -1), entry.tokens)
        return cache
