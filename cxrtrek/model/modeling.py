"""CXRTrekNet: a vision encoder, an MLP projector and a causal language model.

Each image becomes ``image_grid ** 2`` visual tokens: the vision tower's feature map (a
convolutional map, or a ViT's patch tokens laid back on their grid) is average-pooled to a fixed
grid and projected to the LM's hidden size. In the token sequence, every ``<image>`` token is
one visual-token slot; the slots are filled in order with the images of the batch (current
study first, then priors, request after request).
"""

from __future__ import annotations

import copy
import math
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    DynamicCache,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.activations import ACT2FN
from transformers.cache_utils import DynamicLayer
from transformers.modeling_outputs import CausalLMOutputWithPast

from cxrtrek.errors import ConfigError, DataError
from cxrtrek.model.configuration import CXRTrekNetConfig

__all__ = [
    "DENSE_KINDS",
    "FINE_LABELS",
    "CXRTrekNetForConditionalGeneration",
    "DecodeBatch",
    "Decoding",
    "DenseHead",
    "FineHead",
    "Generated",
    "PixelHead",
    "PrefixCache",
    "vision_hidden_size",
]

IGNORE_INDEX = -100

DENSE_KINDS = ("effusion", "pneumothorax", "consolidation", "nodule", "mass", "atelectasis",
               "rib_fracture")
"""Focal finding kinds of the dense per-cell head (:class:`DenseHead`)."""

FINE_LABELS: dict[str, tuple[str, ...]] = {
    "endotracheal_tube": ("appropriate", "low", "high"),
    "central_line": ("svc", "cavoatrial", "atrium"),
    **{kind: ("present",) for kind in DENSE_KINDS},
}
"""What the fine head (:class:`FineHead`) can tell of each kind it reads, besides its absence:
where a device's tip lies, as image descriptions write it (``Endotracheal tube: tip low``),
and a focal finding's presence (its side, zone and size follow from its box)."""


def vision_hidden_size(config: PretrainedConfig) -> int:
    """Channels of the vision tower's last feature map (ResNet-like or ViT-like)."""
    sizes = getattr(config, "hidden_sizes", None)
    if sizes:
        return int(sizes[-1])
    size = getattr(config, "hidden_size", None)
    if size is None:
        raise ConfigError(f"cannot tell the feature size of vision model type "
                          f"{getattr(config, 'model_type', '?')!r}: expected hidden_sizes "
                          "(convolutional) or hidden_size (ViT-like) in its config")
    return int(size)


class CXRTrekNetProjector(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, act: str) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, out_dim)
        self.act = ACT2FN[act]
        self.linear_2 = nn.Linear(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.linear_2(self.act(self.linear_1(x)))
        return out


@dataclass(frozen=True)
class Decoding:
    """How one row is decoded: greedy (``temperature`` None or 0) or sampled."""

    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return not self.temperature


@dataclass(frozen=True)
class Generated:
    """Generated token ids of one row (stop token excluded) and why generation ended."""

    ids: list[int]
    finish_reason: str  # "stop" or "length"


@dataclass
class Prefilled:
    """Prompts processed, ready to decode: each row's last logits, the key/value cache, the
    attention mask (left-padded), each row's last position and prompt length."""

    logits: torch.Tensor
    cache: DynamicCache
    mask: torch.Tensor
    last: torch.Tensor
    lengths: list[int]

    @property
    def rows(self) -> int:
        return len(self.lengths)


def _kv(cache: DynamicCache, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One attention layer's keys and values ``[batch, heads, length, dim]``."""
    keys = getattr(cache.layers[layer], "keys", None)
    values = getattr(cache.layers[layer], "values", None)
    if not isinstance(keys, torch.Tensor) or not isinstance(values, torch.Tensor):
        raise DataError(f"cache layer {layer} holds no keys and values to merge")
    return keys, values


class _SlabLayer(DynamicLayer):  # type: ignore[no-untyped-call]
    """One attention layer of a :class:`_KVSlab`: appending a token writes it in place (a
    :class:`~transformers.DynamicLayer` concatenates, copying the whole cache each token)."""

    def __init__(self, slab: _KVSlab, index: int) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.slab, self.index = slab, index
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        s, n = self.slab, key_states.shape[-2]
        if s.end + n > s.columns:
            raise DataError(f"the decode batch has room for {s.columns - s.end} more "
                            f"token(s), not {n}")
        kb, vb = s.k[self.index], s.v[self.index]
        kb[:s.rows, :, s.end:s.end + n] = key_states
        vb[:s.rows, :, s.end:s.end + n] = value_states
        self.keys = kb[:s.rows, :, s.start:s.end + n]
        self.values = vb[:s.rows, :, s.start:s.end + n]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.slab.end - self.slab.start

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0


class _KVSlab:
    """The keys and values of a decode batch's rows, every layer, in preallocated buffers
    ``[row capacity, kv heads, columns, head dim]``. Rows are right-aligned: every row's next
    token goes to column ``end``, and columns ``start:end`` are the batch's width (a row's
    unused columns on the left are masked out). Rows join by copying their own keys and
    values in, leave by moving the last rows into their places, and decoding writes one
    column a step; the whole batch is copied only when a buffer runs out of room."""

    ROOM = 128
    """Columns kept free on the right: decoding steps between two compactions."""

    def __init__(self, layers: int) -> None:
        self.layers = layers
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.rows = self.start = self.end = 0
        self.cache = DynamicCache()
        self.cache.layers = [_SlabLayer(self, i) for i in range(layers)]

    @property
    def columns(self) -> int:
        return self.k[0].shape[2] if self.k else 0

    @property
    def width(self) -> int:
        return self.end - self.start

    def _reserve(self, rows: int, width: int, like: torch.Tensor) -> None:
        """Room for ``rows`` rows and ``width`` columns ending at ``end``, and for one more
        column after ``end``; ``width`` is at least the current width."""
        capacity = self.k[0].shape[0] if self.k else 0
        if rows <= capacity and width <= self.end < self.columns:
            return  # the rows stay where they are
        cap_rows = capacity if rows <= capacity else max(rows, 2 * capacity, 4)
        old = self.width
        heads, dim = like.shape[1], like.shape[3]
        k, v = [], []
        for layer in range(self.layers):
            nk = like.new_zeros((cap_rows, heads, width + self.ROOM, dim))
            nv = like.new_zeros((cap_rows, heads, width + self.ROOM, dim))
            if self.rows and old:
                nk[:self.rows, :, width - old:width] = \
                    self.k[layer][:self.rows, :, self.start:self.end]
                nv[:self.rows, :, width - old:width] = \
                    self.v[layer][:self.rows, :, self.start:self.end]
            k.append(nk)
            v.append(nv)
        self.k, self.v = k, v
        self.start, self.end = width - old, width

    def compact(self) -> None:
        """Make room for the next column (a copy of the batch when the buffers are full)."""
        self._reserve(self.rows, self.width, self.k[0])

    def join(self, parts: Sequence[Prefilled], width: int) -> None:
        """Copy the rows of ``parts`` in (each part's cache as wide as its mask), the batch
        ``width`` columns wide afterwards (at least as wide as before and as every part)."""
        like = _kv(parts[0].cache, 0)[0]
        self._reserve(self.rows + sum(p.rows for p in parts), width, like)
        self.start = self.end - width
        for p in parts:
            w, r = p.mask.shape[1], self.rows
            for layer in range(self.layers):
                keys, values = _kv(p.cache, layer)
                self.k[layer][r:r + p.rows, :, self.end - w:self.end] = keys
                self.v[layer][r:r + p.rows, :, self.end - w:self.end] = values
            self.rows += p.rows

    def keep(self, keep: Sequence[int]) -> list[int]:
        """Keep rows ``keep`` (ascending): the rows that leave are filled from the last ones.
        Returns the old index of each row in its new order."""
        order = list(range(self.rows))
        kept = set(keep)
        holes = [j for j in range(len(keep)) if j not in kept]
        movers = [j for j in range(len(keep), self.rows) if j in kept]
        if holes:
            dst = torch.tensor(holes, device=self.k[0].device)
            src = torch.tensor(movers, device=self.k[0].device)
            for layer in range(self.layers):
                self.k[layer][dst] = self.k[layer][src]
                self.v[layer][dst] = self.v[layer][src]
            for d, m in zip(holes, movers, strict=True):
                order[d] = m
        self.rows = len(keep)
        return order[:self.rows]

    def trim(self, columns: int) -> None:
        """Forget the first ``columns`` columns (masked out in every row)."""
        self.start += columns

    def advance(self) -> None:
        self.end += 1


class PrefixCache:
    """Processed prompt prefixes kept across calls (LRU): the key/value cache of a prefix's
    tokens, by its image hashes and token ids.

    A reading's stages ask prompts that grow: system prompt, images, the earlier stages'
    turns, then the question. The prefix before one stage's question is the start of the next
    stage's prompt, so with it kept only the new turns and the question are processed. Entries
    hold batch-1 caches; :meth:`longest` returns a copy, so callers may extend it. A prefix
    that extends a kept one replaces it, so a reading holds about one entry.
    """

    def __init__(self, max_entries: int = 16) -> None:
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple[tuple[str, ...], tuple[int, ...]], DynamicCache] = \
            OrderedDict()
        self.hits = 0
        self.tokens_reused = 0

    def __len__(self) -> int:
        return len(self._entries)

    def longest(self, images: tuple[str, ...], ids: Sequence[int],
                min_length: int = 1) -> tuple[int, DynamicCache | None]:
        """The longest kept prefix of ``ids`` (same images): its length and a copy of its
        cache; ``(0, None)`` when none of at least ``min_length`` tokens is kept."""
        best: tuple[tuple[str, ...], tuple[int, ...]] | None = None
        for key in self._entries:
            kimages, kids = key
            n = len(kids)
            if (kimages == images and min_length <= n <= len(ids)
                    and (best is None or n > len(best[1])) and tuple(ids[:n]) == kids):
                best = key
        if best is None:
            return 0, None
        self._entries.move_to_end(best)
        self.hits += 1
        self.tokens_reused += len(best[1])
        return len(best[1]), copy.deepcopy(self._entries[best])

    def put(self, images: tuple[str, ...], ids: Sequence[int], cache: DynamicCache) -> None:
        """Keep a copy of ``cache`` (batch 1, exactly ``ids`` processed)."""
        if self.max_entries <= 0:
            return
        key = (images, tuple(ids))
        for old in [k for k in self._entries if k[0] == images and len(k[1]) < len(ids)
                    and key[1][:len(k[1])] == k[1]]:
            del self._entries[old]  # superseded: a reading's next stage extends the new one
        self._entries[key] = copy.deepcopy(cache)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        self._entries.clear()


@dataclass
class _Row:
    tag: Any
    limit: int
    decoding: Decoding
    gen: torch.Generator
    ids: list[int]
    reason: str = "length"


class DecodeBatch:
    """Rows decoding together, one token per :meth:`step`; prefilled rows may join between
    steps (:meth:`add`) and finished ones leave. A row's tokens do not depend on the other
    rows (its own cache, mask, positions and random generator), so rows of requests that
    arrived apart decode as one batch: continuous batching."""

    def __init__(self, model: CXRTrekNetForConditionalGeneration,
                 stop_token_ids: Sequence[int] | None = None) -> None:
        self.model = model
        self.stops = set(stop_token_ids if stop_token_ids is not None
                         else (model.config.stop_token_ids or []))
        self.state: Prefilled | None = None
        self._rows: list[_Row] = []
        self._slab: _KVSlab | None = None

    @property
    def rows(self) -> int:
        return len(self._rows)

    def tags(self) -> list[Any]:
        return [r.tag for r in self._rows]

    def add(self, part: Prefilled, tags: Sequence[Any], *,
            max_new_tokens: int | Sequence[int] = 64,
            decoding: Sequence[Decoding] | None = None) -> None:
        """Let prefilled rows join (``tags`` name them in :meth:`step`'s results)."""
        self.add_many([(part, tags, max_new_tokens, decoding)])

    @torch.inference_mode()
    def add_many(self, parts: Sequence[tuple[Prefilled, Sequence[Any], int | Sequence[int],
                                             Sequence[Decoding] | None]]) -> None:
        """:meth:`add` for several parts at once (the batch is merged once)."""
        for part, tags, max_new_tokens, decoding in parts:
            n = part.rows
            limits = ([int(max_new_tokens)] * n if isinstance(max_new_tokens, int)
                      else [int(m) for m in max_new_tokens])
            limits = [max(0, min(m, self.model.config.context_length - length))
                      for m, length in zip(limits, part.lengths, strict=True)]
            chosen = list(decoding) if decoding is not None else [Decoding()] * n
            self._rows.extend(
                _Row(tag, limit, d, torch.Generator().manual_seed(
                    d.seed if d.seed is not None else 0), [])
                for tag, limit, d in zip(tags, limits, chosen, strict=True))
        new = [p[0] for p in parts]
        if not new:
            return
        st = self.state
        width = max([p.mask.shape[1] for p in new] + ([st.mask.shape[1]] if st else []))
        if self._slab is None:
            self._slab = _KVSlab(len(new[0].cache.layers))
        self._slab.join(new, width)
        old = [st] if st is not None else []
        self.state = Prefilled(
            logits=torch.cat([p.logits for p in (*old, *new)]), cache=self._slab.cache,
            mask=torch.cat([F.pad(p.mask, (width - p.mask.shape[1], 0)) for p in (*old, *new)]),
            last=torch.cat([p.last for p in (*old, *new)]),
            lengths=[n for p in (*old, *new) for n in p.lengths])

    def drop(self, tags: set[Any]) -> None:
        """Take rows out without an answer (e.g. their caller gave up)."""
        keep = [j for j, r in enumerate(self._rows) if r.tag not in tags]
        self._keep(keep)

    @torch.inference_mode()
    def _keep(self, keep: list[int]) -> list[int]:
        """Keep rows ``keep`` (ascending); the rest leave. Rows may change places: returns
        the old index of each row in its new order."""
        if len(keep) == len(self._rows):
            return keep
        if not keep:
            self._rows, self.state, self._slab = [], None, None
            return []
        assert self.state is not None and self._slab is not None
        order = self._slab.keep(keep)
        self._rows = [self._rows[j] for j in order]
        index = torch.tensor(order, dtype=torch.long, device=self.model.device)
        st = self.state
        mask = st.mask[index]
        lead = int(mask.any(0).int().argmax())  # columns no row uses any more
        if lead:
            mask = mask[:, lead:]
            self._slab.trim(lead)
        self.state = Prefilled(st.logits[index], st.cache, mask, st.last[index],
                               [st.lengths[j] for j in order])
        return order

    @torch.inference_mode()
    def step(self) -> dict[Any, Generated]:
        """Choose every row's next token; the rows that finished (by tag), out of the batch;
        the others advance one token."""
        if self.state is None:
            return {}
        scores = self.state.logits.float()
        finished: dict[Any, Generated] = {}
        tokens: list[int] = []
        for j, row in enumerate(self._rows):
            if row.limit == 0:
                finished[row.tag] = Generated(row.ids, row.reason)
                tokens.append(0)
                continue
            tok = self.model._choose(scores[j], row.decoding, row.gen)
            tokens.append(tok)
            if tok in self.stops:
                row.reason = "stop"
                finished[row.tag] = Generated(row.ids, row.reason)
            else:
                row.ids.append(tok)
                if len(row.ids) >= row.limit:
                    finished[row.tag] = Generated(row.ids, row.reason)
        order = self._keep([j for j, r in enumerate(self._rows) if r.tag not in finished])
        if self.state is None or self._slab is None:
            return finished
        st, slab = self.state, self._slab
        if slab.end >= slab.columns:
            slab.compact()
        step = torch.tensor([[tokens[j]] for j in order], device=self.model.device)
        mask = torch.cat([st.mask, torch.ones_like(st.mask[:, :1])], dim=1)
        last = st.last + 1
        out = self.model.language_model(input_ids=step, attention_mask=mask, position_ids=last,
                                        cache=st.cache, use_cache=True, logits_to_keep=1)
        slab.advance()
        self.state = Prefilled(out.logits[:, -1], st.cache, mask, last, st.lengths)
        return finished


class DenseHead(nn.Module):
    """Per grid cell and focal kind (:data:`DENSE_KINDS`): an objectness logit (the kind's
    box centre lies in this cell) and the box, its centre as an offset within the cell and
    its size as a fraction of the image. Trained in phase 1 of the demo recipe
    (``cxrtrek train --phase vision --dense-head``) on the pooled grid the LM also reads."""

    def __init__(self, channels: int, grid: int, hidden: int = 128) -> None:
        super().__init__()
        self.grid = grid
        self.kinds = len(DENSE_KINDS)
        self.net = nn.Sequential(nn.LayerNorm(channels), nn.Linear(channels, hidden), nn.GELU(),
                                 nn.Linear(hidden, self.kinds * 5))

    def forward(self, pooled: torch.Tensor) -> dict[str, torch.Tensor]:
        n, cells, _ = pooled.shape
        out = self.net(pooled).view(n, cells, self.kinds, 5)
        # each cell's (column, row), made here: a buffer would not survive transformers'
        # loading, which builds the model without data and fills in the saved weights only
        rows = torch.arange(self.grid, device=out.device).repeat_interleave(self.grid)
        cols = torch.arange(self.grid, device=out.device).repeat(self.grid)
        cell_xy = torch.stack([cols, rows], -1).to(out.dtype)
        centre = (cell_xy[None, :, None, :] + torch.sigmoid(out[..., 1:3])) / self.grid
        size = torch.sigmoid(out[..., 3:5])
        boxes = torch.cat([centre - size / 2, centre + size / 2], -1)
        return {"objectness": out[..., 0], "boxes": boxes}

    @staticmethod
    def best_cells(pred: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per image and kind, the objectness of the cell likeliest to hold the kind's box
        centre (N, kinds), and the box there (N, kinds, 4), from :meth:`forward`'s output."""
        objectness, boxes = pred["objectness"], pred["boxes"]  # (N, cells, kinds[, 4])
        best = objectness.argmax(1, keepdim=True)  # (N, 1, kinds)
        scores = objectness.gather(1, best).squeeze(1)
        chosen = boxes.gather(1, best.unsqueeze(-1).expand(-1, -1, -1, 4)).squeeze(1)
        return scores, chosen


class FineHead(nn.Module):
    """Devices and small findings read from a finer feature map of the tower than the pooled
    grid: a tube is a line one or two pixels wide, and a nodule a few pixels across, of which
    the last feature map keeps little. Per kind (of :data:`FINE_LABELS`), whether it is there and
    what it is (one class for "absent", then one per label) from the whole map, reduced to a
    few channels a cell; and its box as a one-stage detector finds it, per cell an objectness
    logit (the box's centre lies in this cell), the centre as an offset within the cell and
    the size. Trained on a frozen tower (:func:`cxrtrek.model.fine_head.fit_fine_head`)."""

    def __init__(self, channels: int, grid: int, kinds: Sequence[str], reduced: int = 16,
                 hidden: int = 32) -> None:
        super().__init__()
        self.grid = grid
        self.kinds = list(kinds)
        self.classes = 1 + max(len(FINE_LABELS[k]) for k in self.kinds)
        n = len(self.kinds)
        self.reduce = nn.Sequential(nn.BatchNorm2d(channels), nn.Conv2d(channels, reduced, 1),
                                    nn.GELU())
        self.classify = nn.Linear(reduced * grid * grid, n * self.classes)
        self.locate = nn.Sequential(nn.Conv2d(channels, hidden, 3, padding=1), nn.GELU(),
                                    nn.Conv2d(hidden, n * 5, 1))

    def forward(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        """``features`` (N, channels, grid, grid) -> ``classes`` (N, kinds, classes),
        ``objectness`` (N, kinds, cells) and ``boxes`` (N, kinds, cells, 4), as fractions of
        the image."""
        n, kinds = features.shape[0], len(self.kinds)
        classes = self.classify(self.reduce(features).flatten(1)).view(n, kinds, self.classes)
        out = self.locate(features).view(n, kinds, 5, self.grid * self.grid)
        return {"classes": classes, "objectness": out[:, :, 0],
                "boxes": _cell_boxes(out, self.grid)}


def _cell_boxes(out: torch.Tensor, grid: int) -> torch.Tensor:
    """Each cell's box (N, kinds, cells, 4; fractions of the image) from a detector's output
    (N, kinds, 5, cells): the centre's offset within the cell, then the size, each through a
    sigmoid (a small finding's or a tip's box: at most half the image)."""
    rows = torch.arange(grid, device=out.device).repeat_interleave(grid)
    cols = torch.arange(grid, device=out.device).repeat(grid)
    cell_xy = torch.stack([cols, rows], 0).to(out.dtype)  # (2, cells)
    centre = (cell_xy + torch.sigmoid(out[:, :, 1:3])) / grid
    size = torch.sigmoid(out[:, :, 3:5]) * 0.5
    return torch.cat([centre - size / 2, centre + size / 2], 2).transpose(2, 3)


def _conv_block(inputs: int, outputs: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(inputs, outputs, 3, stride, 1, bias=False),
                         nn.BatchNorm2d(outputs), nn.ReLU())


class PixelHead(nn.Module):
    """Findings smaller than the tower's first stride, read from the image itself. A rib's
    break is a gap of a pixel or two and a step of about one in the rib; the tower's stem
    blurs it away, and none of its hidden states holds it (the card's layer probe). The head
    has a small convolutional stem of its own: halvings (3 x 3 convolutions of stride 2, which
    still see every pixel) down to a ``grid`` x ``grid`` map. Per kind and cell, an objectness
    logit (the finding's centre lies in this cell) and a box, as :class:`FineHead` finds them;
    a kind is present where the log-sum-exp of its objectness over the cells, plus a learnt
    bias, is above 0 (it is there when some cell holds it, wherever it lies). Its output is
    :class:`FineHead`'s, with two classes a kind (absent, present); its kinds are findings
    (:data:`DENSE_KINDS`). Trained beside a frozen tower
    (:func:`cxrtrek.model.fine_head.fit_pixel_head`)."""

    WIDTHS = (16, 32, 48, 64)
    """Channels after each halving (the last halving's is the map the kinds are read from)."""

    def __init__(self, size: int, grid: int, kinds: Sequence[str], channels: int = 1) -> None:
        super().__init__()
        halvings = (size // grid).bit_length() - 1 if 1 <= grid <= size else 0
        if not 1 <= halvings <= len(self.WIDTHS) or size != grid << halvings:
            raise ConfigError(f"pixel head: the grid ({grid}) must be the image size ({size}) "
                              f"halved 1 to {len(self.WIDTHS)} times")
        self.size, self.grid, self.kinds = size, grid, list(kinds)
        self.classes = 2
        layers: list[nn.Module] = []
        width = channels
        for i in range(halvings):
            layers.append(_conv_block(width, self.WIDTHS[i], 2))
            width = self.WIDTHS[i]
            if i == halvings - 2:  # one more look at the last map but one
                layers.append(_conv_block(width, width, 1))
        self.stem = nn.Sequential(*layers)
        self.locate = nn.Conv2d(width, len(self.kinds) * 5, 1)
        self.bias = nn.Parameter(torch.zeros(len(self.kinds)))

    def forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """``pixels`` (N, channels, size, size), normalised as the tower's input ->
        :meth:`FineHead.forward`'s ``classes``, ``objectness`` and ``boxes``."""
        n, kinds = pixels.shape[0], len(self.kinds)
        out = self.locate(self.stem(pixels)).view(n, kinds, 5, self.grid * self.grid)
        objectness = out[:, :, 0]
        present = torch.logsumexp(objectness, -1) + self.bias
        classes = torch.stack([torch.zeros_like(present), present], -1)
        return {"classes": classes, "objectness": objectness,
                "boxes": _cell_boxes(out, self.grid)}


class CXRTrekNetForConditionalGeneration(PreTrainedModel):  # type: ignore[no-untyped-call]
    config_class = CXRTrekNetConfig
    config: CXRTrekNetConfig
    base_model_prefix = "cxrtrek_net"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_attention_backend = True

    def __init__(self, config: CXRTrekNetConfig) -> None:
        super().__init__(config)
        self.vision_tower = AutoModel.from_config(config.vision)  # type: ignore[no-untyped-call]
        self.projector = CXRTrekNetProjector(
            vision_hidden_size(config.vision), config.text.hidden_size,
            config.projector_hidden_act)
        self.language_model = AutoModelForCausalLM.from_config(  # type: ignore[no-untyped-call]
            config.text)
        self.dense_head: DenseHead | None = None
        """The vision tower's dense per-cell head, with the config's ``dense_head_kinds``: it
        writes those kinds' sentences of the model's own image descriptions
        (:meth:`find_focal`; :func:`cxrtrek.data.phantoms.questions.revise_description`)."""
        if config.dense_head_kinds:
            self.dense_head = _dense_head_for(config)
        self.fine_head: FineHead | None = None
        """The tower's fine head, with the config's ``fine_head``: it writes the sentences of
        its kinds in the model's own image descriptions (:meth:`find_fine`)."""
        if config.fine_head:
            self.fine_head = _fine_head_for(config)
        self.pixel_head: PixelHead | None = None
        """The pixel head, with the config's ``pixel_head``: it reads findings too small for
        the tower from the image itself, and writes their sentences like the fine head's."""
        if config.pixel_head:
            self.pixel_head = _pixel_head_of(config.pixel_head, int(config.image_channels))
        self.post_init()  # type: ignore[no-untyped-call]
        if config.freeze_vision:
            self.freeze_vision(True)

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any) -> Any:
        """transformers' loader, then the config's vision freezing (loading resets it)."""
        model = super().from_pretrained(*args, **kwargs)
        if model.config.freeze_vision:
            model.freeze_vision(True)
        return model

    # --- parts ------------------------------------------------------------------------------

    def freeze_vision(self, frozen: bool = True) -> None:
        """Freeze (or unfreeze) the vision tower; a frozen tower stays in eval mode. Its dense
        and fine heads are frozen with it (they read the tower's features as they were
        trained), and the pixel head (trained beside it)."""
        self.vision_tower.requires_grad_(not frozen)
        for head in (self.dense_head, self.fine_head, self.pixel_head):
            if head is not None:
                head.requires_grad_(not frozen)
        if frozen:
            self.vision_tower.eval()

    def attach_dense_head(self, state: dict[str, torch.Tensor],
                          kinds: Mapping[str, Sequence[float]]) -> None:
        """Give the model a trained dense head (``vision_dense_head.pt`` of a phase-1 run
        with ``--dense-head``, trained on this very tower) that writes the sentences of
        ``kinds`` (kind -> ``[alone, confirm]`` thresholds, as the config's
        ``dense_head_kinds``) in its image descriptions; the config records them."""
        self.config.dense_head_kinds = _dense_kinds(kinds)
        head = _dense_head_for(self.config)
        head.load_state_dict(state)
        param = next(self.vision_tower.parameters())
        self.dense_head = head.to(device=param.device, dtype=param.dtype)
        self.freeze_vision(self.vision_frozen)

    def find_focal(self, pixel_values: torch.Tensor,
                   ) -> list[dict[str, tuple[float, list[float]]]]:
        """The dense head's reading of each image: for each of the config's
        ``dense_head_kinds``, the objectness logit of the cell most likely to hold its centre
        and the box there (percent of the image, ``[x1, y1, x2, y2]``)."""
        if self.dense_head is None:
            raise ConfigError("this CXRTrekNet has no dense head (its config names no "
                              "dense_head_kinds)")
        with torch.inference_mode():
            return self._focal_reading(self.get_pooled_features(pixel_values))

    def _focal_reading(self, pooled: torch.Tensor) -> list[dict[str, tuple[float, list[float]]]]:
        """:meth:`find_focal` from the pooled features (the model has a dense head)."""
        assert self.dense_head is not None
        kinds = list(self.config.dense_head_kinds or ())
        pred = self.dense_head(pooled.to(next(self.dense_head.parameters()).dtype))
        scores, boxes = (t.float() for t in DenseHead.best_cells(pred))
        index = [DENSE_KINDS.index(kind) for kind in kinds]
        return [{kind: (float(scores[n, k]),
                        [round(100.0 * float(v), 2) for v in boxes[n, k].clamp(0, 1)])
                 for kind, k in zip(kinds, index, strict=True)}
                for n in range(len(scores))]

    def read_heads(self, pixel_values: torch.Tensor,
                   ) -> tuple[list[dict[str, tuple[float, list[float]]]],
                              list[dict[str, tuple[str | None, list[float]]]]]:
        """The vision heads' reading of each image, from one pass of the tower: the dense
        head's (:meth:`find_focal`), and the fine and pixel heads' (:meth:`find_fine`); an
        empty reading per image for a head the model does not have."""
        n = int(pixel_values.shape[0])
        focal: list[dict[str, tuple[float, list[float]]]] = [{} for _ in range(n)]
        fine: list[dict[str, tuple[str | None, list[float]]]] = [{} for _ in range(n)]
        with torch.inference_mode():
            if self.dense_head is not None or self.fine_head is not None:
                out = self._tower(pixel_values, hidden=self.fine_head is not None)
                if self.dense_head is not None:
                    focal = self._focal_reading(self._pool(out.last_hidden_state))
                if self.fine_head is not None:
                    fine = _reading(self.fine_head,
                                    out.hidden_states[int(self._fine_spec()["layer"])])
            if self.pixel_head is not None:
                pixels = pixel_values.to(device=self.device)
                for seen, more in zip(fine, _reading(self.pixel_head, pixels), strict=True):
                    seen.update(more)
        return focal, fine

    def _tower(self, pixel_values: torch.Tensor, *, hidden: bool = False) -> Any:
        """The vision tower's output for ``pixel_values`` (moved to its device and dtype;
        no gradient into a frozen tower), with every hidden state when ``hidden``."""
        vision_dtype = next(self.vision_tower.parameters()).dtype
        pixel_values = pixel_values.to(device=self.device, dtype=vision_dtype)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.vision_frozen):
            return self.vision_tower(pixel_values=pixel_values, output_hidden_states=hidden)

    def _fine_spec(self) -> dict[str, Any]:
        if not self.config.fine_head:
            raise ConfigError("this CXRTrekNet has no fine head (its config has no fine_head)")
        return self.config.fine_head

    def fine_features(self, pixel_values: torch.Tensor,
                      layer: int | None = None) -> torch.Tensor:
        """The tower's hidden state ``layer`` (as transformers counts them: 0 is the stem's
        output; by default the one the config's ``fine_head`` reads)."""
        if layer is None:
            layer = int(self._fine_spec()["layer"])
        state: torch.Tensor = self._tower(pixel_values, hidden=True).hidden_states[layer]
        return state

    def attach_fine_head(self, state: dict[str, torch.Tensor], layer: int,
                         kinds: Sequence[str]) -> None:
        """Give the model a trained fine head (:func:`cxrtrek.model.fine_head.fit_fine_head`,
        trained on this very tower's hidden state ``layer`` for ``kinds``); the config records
        it."""
        size = int(self.config.image_size)
        probe = torch.zeros(1, int(self.config.image_channels), size, size)
        with torch.inference_mode():
            shape = self.fine_features(probe, layer).shape
        spec = {"layer": layer, "channels": int(shape[1]), "grid": int(shape[2]),
                "kinds": list(kinds)}
        head = _fine_head_of(spec)
        head.load_state_dict(state)
        self.config.fine_head = spec
        param = next(self.vision_tower.parameters())
        self.fine_head = head.to(device=param.device, dtype=param.dtype).eval()
        self.freeze_vision(self.vision_frozen)

    def attach_pixel_head(self, state: dict[str, torch.Tensor], grid: int,
                          kinds: Sequence[str]) -> None:
        """Give the model a trained pixel head (:func:`cxrtrek.model.fine_head.fit_pixel_head`,
        for this model's image size, reading ``kinds`` on a ``grid`` x ``grid`` map); the
        config records it (``pixel_head``)."""
        spec = {"size": int(self.config.image_size), "grid": int(grid), "kinds": list(kinds)}
        head = _pixel_head_of(spec, int(self.config.image_channels))
        head.load_state_dict(state)
        self.config.pixel_head = spec
        param = next(self.vision_tower.parameters())
        self.pixel_head = head.to(device=param.device, dtype=param.dtype).eval()
        self.freeze_vision(self.vision_frozen)

    def find_fine(self, pixel_values: torch.Tensor,
                  ) -> list[dict[str, tuple[str | None, list[float]]]]:
        """The fine and pixel heads' reading of each image: for each of their kinds, what it
        is (a label of :data:`FINE_LABELS`; None: absent) and its box at the cell likeliest to
        hold its centre (percent of the image, ``[x1, y1, x2, y2]``); the pixel head's for a
        kind both read."""
        if self.fine_head is None and self.pixel_head is None:
            raise ConfigError("this CXRTrekNet has no fine head and no pixel head (its config "
                              "has no fine_head and no pixel_head)")
        return self.read_heads(pixel_values)[1]

    @property
    def vision_frozen(self) -> bool:
        return not any(p.requires_grad for p in self.vision_tower.parameters())

    def train(self, mode: bool = True) -> CXRTrekNetForConditionalGeneration:
        super().train(mode)
        if self.vision_frozen:  # batch norm statistics must not drift in a frozen tower
            self.vision_tower.eval()
            for head in (self.fine_head, self.pixel_head):
                if head is not None:
                    head.eval()
        return self

    def get_input_embeddings(self) -> nn.Module:
        emb: nn.Module = self.language_model.get_input_embeddings()
        return emb

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    # --- images -----------------------------------------------------------------------------

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Projected visual tokens (n_images, image_grid ** 2, text hidden size)."""
        return self.project_image_features(self.get_pooled_features(pixel_values))

    def get_pooled_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The vision tower's feature map pooled to the grid, before the projector:
        (n_images, image_grid ** 2, vision channels). A frozen tower's output can be cached."""
        return self._pool(self._tower(pixel_values).last_hidden_state)

    def _pool(self, feats: torch.Tensor) -> torch.Tensor:
        """The tower's last feature map pooled to the grid (see :meth:`get_pooled_features`)."""
        if feats.dim() == 3:  # ViT-like (N, L, C): drop prefix tokens, lay patches on the grid
            n, length, c = feats.shape
            side = math.isqrt(length)
            feats = feats[:, length - side * side:].transpose(1, 2).reshape(n, c, side, side)
        grid = int(self.config.image_grid)
        pooled: torch.Tensor = F.adaptive_avg_pool2d(feats, (grid, grid))
        pooled = pooled.flatten(2).transpose(1, 2)
        return pooled

    def project_image_features(self, pooled: torch.Tensor, *,
                               token_norm: bool = True) -> torch.Tensor:
        """Visual tokens from pooled features (see :meth:`get_pooled_features`); with the
        config's ``image_token_norm``, centred across each image's cells, then each scaled to
        unit norm (``token_norm=False``: the projector's output before that, e.g. for an
        image embedding that averages the cells, which centring would cancel)."""
        proj_dtype = self.projector.linear_1.weight.dtype
        out: torch.Tensor = self.projector(pooled.to(device=self.device, dtype=proj_dtype))
        if token_norm and getattr(self.config, "image_token_norm", False):
            out = out - out.mean(dim=1, keepdim=True)
            out = out / out.norm(dim=-1, keepdim=True).clamp(min=1e-6)
        return out

    def _merge_images(self, input_ids: torch.Tensor, embeds: torch.Tensor,
                      image_embeds: torch.Tensor | None) -> torch.Tensor:
        slots = input_ids == self.config.image_token_id
        n_slots = int(slots.sum())
        n_feats = 0 if image_embeds is None else image_embeds.shape[0] * image_embeds.shape[1]
        if n_slots != n_feats:
            per = self.config.tokens_per_image
            raise DataError(f"the text has {n_slots} image-token slots ({n_slots / per:g} images "
                            f"of {per} tokens) but {n_feats // per} images were given")
        if image_embeds is None:
            return embeds
        return embeds.masked_scatter(slots.unsqueeze(-1), image_embeds.to(embeds.dtype))

    # --- forward ----------------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        cache: Any = None,
        pooled_features: torch.Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """Logits (and the loss on ``labels``, -100 ignored). Pass images as ``pixel_values``,
        as already-projected ``image_embeds`` (e.g. from a cache) or as the frozen tower's
        ``pooled_features`` (projected here, so the projector trains)."""
        if image_embeds is None and pooled_features is not None:
            image_embeds = self.project_image_features(pooled_features)
        if image_embeds is None and pixel_values is not None:
            image_embeds = self.get_image_features(pixel_values)
        embeds = self.get_input_embeddings()(input_ids)
        embeds = self._merge_images(input_ids, embeds, image_embeds)
        if position_ids is None and attention_mask is not None and cache is None \
                and attention_mask.dim() == 2:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        out = self.language_model(
            inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids,
            cache=cache, use_cache=use_cache, logits_to_keep=logits_to_keep, **kwargs)
        loss = None
        if labels is not None:
            logits = out.logits[:, :-1].float()
            target = labels[:, 1:].to(logits.device)
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                   ignore_index=IGNORE_INDEX)
        return CausalLMOutputWithPast(loss=loss, logits=out.logits,
                                      cache=getattr(out, "cache", None))

    # --- generation -------------------------------------------------------------------------

    @torch.no_grad()
    def generate_batch(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        *,
        image_embeds: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        max_new_tokens: int | Sequence[int] = 64,
        decoding: Sequence[Decoding] | None = None,
        stop_token_ids: Sequence[int] | None = None,
    ) -> list[Generated]:
        """Decode a left-padded batch: greedy by default, per-row sampling settings optional.

        Rows are independent: a row's output does not depend on the other rows (left padding
        and per-row position ids and random generators).
        """
        return self.decode_prefilled(
            [self.prefill_batch(input_ids, attention_mask, image_embeds=image_embeds,
                                pixel_values=pixel_values)],
            max_new_tokens=max_new_tokens, decoding=decoding, stop_token_ids=stop_token_ids)

    @torch.no_grad()
    def prefill_batch(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *,
                      image_embeds: torch.Tensor | None = None,
                      pixel_values: torch.Tensor | None = None) -> Prefilled:
        """Process a left-padded batch of prompts (see :meth:`generate_batch`)."""
        device = self.device
        input_ids = input_ids.to(device)
        mask = attention_mask.to(device)
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.config.text)
        out = self(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                   pixel_values=pixel_values, image_embeds=image_embeds, cache=cache,
                   use_cache=True, logits_to_keep=1)
        return Prefilled(out.logits[:, -1], out.cache, mask, positions[:, -1:],
                         [int(n) for n in mask.sum(-1).tolist()])

    @torch.no_grad()
    def generate_with_prefix(
        self,
        prefix_ids: Sequence[int],
        suffixes: Sequence[Sequence[int]],
        *,
        image_embeds: torch.Tensor | None = None,
        max_new_tokens: int | Sequence[int] = 64,
        decoding: Sequence[Decoding] | None = None,
        stop_token_ids: Sequence[int] | None = None,
        prefix_cache: PrefixCache | None = None,
        image_key: tuple[str, ...] = (),
    ) -> list[Generated]:
        """Decode prompts that share a prefix (``prefix_ids + suffixes[i]``): the prefix, with
        all the images (``image_embeds``), is processed once; the suffixes (no image tokens,
        at least one token each) are processed together in one row without padding, each
        seeing only the prefix and itself; then every row (the prefix's cache and its own
        suffix's) decodes in one batch. The questions of one stage share images, system
        prompt and earlier stages, so this saves most of the prompt work of a stage.

        With ``prefix_cache`` (and the images' hashes as ``image_key``), the longest kept
        start of the prefix is reused (only the rest is processed) and the prefix is kept for
        later calls: an earlier stage's prefix is the start of the next stage's.
        """
        return self.decode_prefilled(
            [self.prefill_with_prefix(prefix_ids, suffixes, image_embeds=image_embeds,
                                      prefix_cache=prefix_cache, image_key=image_key)],
            max_new_tokens=max_new_tokens, decoding=decoding, stop_token_ids=stop_token_ids)

    @torch.no_grad()
    def prefill_with_prefix(
        self,
        prefix_ids: Sequence[int],
        suffixes: Sequence[Sequence[int]],
        *,
        image_embeds: torch.Tensor | None = None,
        prefix_cache: PrefixCache | None = None,
        image_key: tuple[str, ...] = (),
    ) -> Prefilled:
        """Process prompts that share a prefix (see :meth:`generate_with_prefix`)."""
        cache = self._processed_prefix(prefix_ids, suffixes, image_embeds=image_embeds,
                                       prefix_cache=prefix_cache, image_key=image_key)
        batch, plen = len(suffixes), len(prefix_ids)
        device = self.device
        if batch == 1:
            ids = torch.tensor([list(suffixes[0])], dtype=torch.long, device=device)
            positions = torch.arange(plen, plen + ids.shape[1], device=device).unsqueeze(0)
            mask = torch.ones((1, plen + ids.shape[1]), dtype=torch.long, device=device)
            out = self.language_model(input_ids=ids, attention_mask=mask,
                                      position_ids=positions, cache=cache, use_cache=True,
                                      logits_to_keep=1)
            return Prefilled(out.logits[:, -1], out.cache, mask, positions[:, -1:],
                             [plen + ids.shape[1]])
        return self._prefill_packed(plen, suffixes, cache)

    def _processed_prefix(self, prefix_ids: Sequence[int], suffixes: Sequence[Sequence[int]],
                          *, image_embeds: torch.Tensor | None,
                          prefix_cache: PrefixCache | None,
                          image_key: tuple[str, ...]) -> DynamicCache:
        """The key/value cache of ``prefix_ids`` (with all the images): the longest kept start
        from ``prefix_cache``, the rest processed here and the whole prefix kept."""
        if not prefix_ids or any(not s for s in suffixes):
            raise DataError("a shared prefix and non-empty suffixes are required")
        if any(self.config.image_token_id in s for s in suffixes):
            raise DataError("image tokens must all lie in the shared prefix")
        plen = len(prefix_ids)
        device = self.device
        done, cache = 0, None
        if prefix_cache is not None:
            last_image = max((i for i, t in enumerate(prefix_ids)
                              if t == self.config.image_token_id), default=-1)
            done, cache = prefix_cache.longest(image_key, prefix_ids, min_length=last_image + 1)
        if cache is None:
            done, cache = 0, DynamicCache(config=self.config.text)
        if done < plen:  # the part not kept (everything, without a cache hit)
            rest = torch.tensor([list(prefix_ids[done:])], dtype=torch.long, device=device)
            self(input_ids=rest,
                 attention_mask=torch.ones((1, plen), dtype=torch.long, device=device),
                 position_ids=torch.arange(done, plen, device=device).unsqueeze(0),
                 image_embeds=image_embeds if done == 0 else None, cache=cache,
                 use_cache=True, logits_to_keep=1)
            if prefix_cache is not None:
                prefix_cache.put(image_key, prefix_ids, cache)
        return cache

    def _prefill_packed(self, plen: int, suffixes: Sequence[Sequence[int]],
                        cache: DynamicCache) -> Prefilled:
        """The suffixes after a processed prefix (``cache``, one row), packed in one row
        without padding: each suffix sees the prefix and itself only (a block-diagonal mask),
        at the positions it would have alone. Then each row's cache is the prefix's followed
        by its own suffix's (left-padded to the longest)."""
        device = self.device
        lengths = [len(s) for s in suffixes]
        ends = torch.tensor(lengths, device=device).cumsum(0)
        starts = ends - torch.tensor(lengths, device=device)
        out = self._packed_pass(plen, suffixes, cache, logits_to_keep=ends - 1)
        width = plen + max(lengths)
        rows = DynamicCache()
        for layer in range(len(cache.layers)):
            keys, values = _kv(cache, layer)
            rk = keys.new_zeros((len(lengths), keys.shape[1], width, keys.shape[3]))
            rv = values.new_zeros(rk.shape)
            for i, (a, n) in enumerate(zip(starts.tolist(), lengths, strict=True)):
                pad = width - plen - n
                rk[i, :, pad:pad + plen] = keys[0, :, :plen]
                rv[i, :, pad:pad + plen] = values[0, :, :plen]
                rk[i, :, pad + plen:] = keys[0, :, plen + a:plen + a + n]
                rv[i, :, pad + plen:] = values[0, :, plen + a:plen + a + n]
            rows.update(rk, rv, layer)
        mask = torch.zeros((len(lengths), width), dtype=torch.long, device=device)
        for i, n in enumerate(lengths):
            mask[i, width - plen - n:] = 1
        return Prefilled(out.logits[0], rows, mask, (plen + ends - starts - 1).unsqueeze(1),
                         [plen + n for n in lengths])

    def _packed_pass(self, plen: int, suffixes: Sequence[Sequence[int]], cache: DynamicCache,
                     logits_to_keep: int | torch.Tensor) -> Any:
        """The language model over ``suffixes`` packed in one row after a processed prefix of
        ``plen`` tokens (``cache``): each suffix sees the prefix and itself only (a
        block-diagonal mask), at the positions it would have alone."""
        device = self.device
        lengths = torch.tensor([len(s) for s in suffixes], device=device)
        total = int(lengths.sum())
        starts = lengths.cumsum(0) - lengths
        seg = torch.repeat_interleave(torch.arange(len(suffixes), device=device), lengths)
        offset = torch.arange(total, device=device) - starts[seg]
        ids = torch.tensor([[t for s in suffixes for t in s]], dtype=torch.long, device=device)
        allowed = torch.ones((total, plen + total), dtype=torch.bool, device=device)
        allowed[:, plen:] = (seg[:, None] == seg[None, :]) & (offset[:, None] >= offset[None, :])
        return self.language_model(input_ids=ids, attention_mask=allowed[None, None],
                                   position_ids=(plen + offset).unsqueeze(0), cache=cache,
                                   use_cache=True, logits_to_keep=logits_to_keep)

    @torch.no_grad()
    def score_suffixes(
        self,
        prefix_ids: Sequence[int],
        suffixes: Sequence[Sequence[int]],
        scored: Sequence[int],
        *,
        image_embeds: torch.Tensor | None = None,
        prefix_cache: PrefixCache | None = None,
        image_key: tuple[str, ...] = (),
        keep: int | None = None,
        chunk: int = 8,
    ) -> list[float]:
        """The log-probability of the last ``scored[i]`` tokens of each ``prefix_ids +
        suffixes[i]``, given what comes before them: how likely the model finds each candidate
        answer to one prompt (the prompt but its last token is the prefix; that token and one
        candidate make a suffix). The prefix (with all the images) is processed once: its
        first ``keep`` tokens (default: all) through ``prefix_cache`` as in
        :meth:`prefill_with_prefix` (e.g. the part before the question, which the next
        question shares), the rest on top of them and not kept; then the suffixes ``chunk`` at
        a time, each chunk packed in one row."""
        if len(scored) != len(suffixes) or any(
                not 0 < m < len(s) for m, s in zip(scored, suffixes, strict=True)):
            raise DataError("each suffix must be longer than its scored tail, which must be "
                            "at least one token")
        plen = len(prefix_ids)
        keep = plen if keep is None else keep
        if not 0 < keep <= plen or self.config.image_token_id in prefix_ids[keep:]:
            raise DataError("keep must cover every image token and at most the whole prefix")
        cache = self._processed_prefix(prefix_ids[:keep], suffixes, image_embeds=image_embeds,
                                       prefix_cache=prefix_cache, image_key=image_key)
        if keep < plen:  # the rest of the prefix, on a copy that is not kept
            rest = torch.tensor([list(prefix_ids[keep:])], dtype=torch.long, device=self.device)
            self.language_model(
                input_ids=rest,
                attention_mask=torch.ones((1, plen), dtype=torch.long, device=self.device),
                position_ids=torch.arange(keep, plen, device=self.device).unsqueeze(0),
                cache=cache, use_cache=True, logits_to_keep=1)
        scores: list[float] = []
        for first in range(0, len(suffixes), max(1, chunk)):
            part = suffixes[first:first + max(1, chunk)]
            out = self._packed_pass(plen, part, cache, logits_to_keep=0)
            extra = cache.get_seq_length() - plen
            if extra > 0:  # the next chunk sees the prefix alone again
                cache.crop(-extra)
            logp = out.logits[0].float().log_softmax(-1)
            end = 0
            for suffix, m in zip(part, scored[first:first + len(part)], strict=True):
                end += len(suffix)
                targets = torch.tensor(list(suffix[-m:]), dtype=torch.long, device=logp.device)
                rows = logp[end - m - 1:end - 1]  # the logits before each scored token
                scores.append(float(rows.gather(1, targets[:, None]).sum()))
        return scores

    @torch.no_grad()
    def decode_prefilled(self, parts: Sequence[Prefilled], *,
                         max_new_tokens: int | Sequence[int] = 64,
                         decoding: Sequence[Decoding] | None = None,
                         stop_token_ids: Sequence[int] | None = None) -> list[Generated]:
        """The token-by-token loop after the prompts, all ``parts`` (e.g. the questions of
        several readings, prefilled apart) decoded as one batch, rows in order. Each row may
        take ``context_length - its prompt length`` new tokens at most; finished rows leave
        the batch, so a long answer does not keep the short ones computing."""
        n = sum(p.rows for p in parts)
        n_limits = n if isinstance(max_new_tokens, int) else len(max_new_tokens)
        n_chosen = n if decoding is None else len(decoding)
        if n_limits != n or n_chosen != n:
            raise DataError(f"{n} prompts but {n_limits} token limits and {n_chosen} "
                            "decoding settings")
        batch = DecodeBatch(self, stop_token_ids)
        entries, k = [], 0
        for p in parts:  # add_many spreads a single limit and the default decoding
            rows = slice(k, k + p.rows)
            entries.append((p, range(k, k + p.rows),
                            max_new_tokens if isinstance(max_new_tokens, int)
                            else max_new_tokens[rows],
                            None if decoding is None else decoding[rows]))
            k += p.rows
        batch.add_many(entries)
        out: dict[Any, Generated] = {}
        while batch.rows:
            out.update(batch.step())
        return [out[i] for i in range(n)]

    @staticmethod
    def _choose(logits: torch.Tensor, decoding: Decoding, gen: torch.Generator) -> int:
        if decoding.greedy:
            return int(torch.argmax(logits))
        probs = torch.softmax(logits.cpu() / float(decoding.temperature or 1.0), dim=-1)
        if decoding.top_p is not None and decoding.top_p < 1.0:
            sorted_p, order = torch.sort(probs, descending=True)
            keep = sorted_p.cumsum(-1) - sorted_p < decoding.top_p
            probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
        return int(torch.multinomial(probs, 1, generator=gen))


def _dense_kinds(kinds: Mapping[str, Sequence[float]]) -> dict[str, list[float]]:
    """The config's ``dense_head_kinds``, checked."""
    unknown = [k for k in kinds if k not in DENSE_KINDS]
    if unknown or not kinds:
        raise ConfigError(f"dense head kinds: expected some of {', '.join(DENSE_KINDS)}; got "
                          f"{', '.join(kinds) or 'none'}")
    out: dict[str, list[float]] = {}
    for kind, pair in kinds.items():
        if len(pair) != 2:
            raise ConfigError(f"dense head kind {kind}: expected two thresholds [alone, "
                              f"confirm]; got {list(pair)}")
        out[kind] = [float(v) for v in pair]
    return out


def _dense_head_for(config: CXRTrekNetConfig) -> DenseHead:
    _dense_kinds(config.dense_head_kinds or {})
    return DenseHead(vision_hidden_size(config.vision), int(config.image_grid))


def _fine_head_for(config: CXRTrekNetConfig) -> FineHead:
    return _fine_head_of(config.fine_head or {})


def _fine_head_of(spec: Mapping[str, Any]) -> FineHead:
    """A fine head as ``spec`` (a config's ``fine_head``) describes it, checked."""
    if set(spec) != {"layer", "channels", "grid", "kinds"}:
        raise ConfigError(f"fine_head: expected layer, channels, grid and kinds; got {spec}")
    unknown = [k for k in spec["kinds"] if k not in FINE_LABELS]
    if unknown or not spec["kinds"]:
        raise ConfigError(f"fine head kinds: expected some of {', '.join(FINE_LABELS)}; got "
                          f"{', '.join(spec['kinds']) or 'none'}")
    return FineHead(int(spec["channels"]), int(spec["grid"]), spec["kinds"])


def _pixel_head_of(spec: Mapping[str, Any], channels: int) -> PixelHead:
    """A pixel head as ``spec`` (a config's ``pixel_head``) describes it, checked: its kinds
    are findings (a device's tip position is the fine head's)."""
    if set(spec) != {"size", "grid", "kinds"}:
        raise ConfigError(f"pixel_head: expected size, grid and kinds; got {spec}")
    unknown = [k for k in spec["kinds"] if k not in DENSE_KINDS]
    if unknown or not spec["kinds"]:
        raise ConfigError(f"pixel head kinds: expected some of {', '.join(DENSE_KINDS)}; got "
                          f"{', '.join(spec['kinds']) or 'none'}")
    return PixelHead(int(spec["size"]), int(spec["grid"]), spec["kinds"], channels)


def _reading(head: FineHead | PixelHead, x: torch.Tensor,
             ) -> list[dict[str, tuple[str | None, list[float]]]]:
    """A fine or pixel head's reading of its input ``x`` (a hidden state, or the pixels),
    image by image: per kind, its label (None: absent) and its box at the likeliest cell."""
    head.eval()
    pred = head(x.to(next(head.parameters()).dtype))
    best = pred["objectness"].argmax(-1)  # (N, kinds)
    boxes = pred["boxes"].gather(2, best[..., None, None].expand(-1, -1, 1, 4)).squeeze(2)
    out: list[dict[str, tuple[str | None, list[float]]]] = []
    for n in range(boxes.shape[0]):
        seen: dict[str, tuple[str | None, list[float]]] = {}
        for k, kind in enumerate(head.kinds):
            labels = FINE_LABELS[kind]
            pick = int(pred["classes"][n, k, :1 + len(labels)].argmax())
            seen[kind] = (None if pick == 0 else labels[pick - 1],
                          [round(100.0 * float(v), 2) for v in boxes[n, k].clamp(0, 1)])
        out.append(seen)
    return out
