"""BERTScore F1 from a local BERT-like model (no download, ever).

Each text is encoded by the model (``AutoModel`` + ``AutoTokenizer`` from a folder, offline);
the token embeddings of a hidden layer (the last by default), without the special tokens,
are L2-normalised; precision is the mean over candidate tokens of the best cosine similarity
to a reference token, recall the same the other way, F1 their harmonic mean (Zhang et al.,
2020, without idf weighting and without baseline rescaling). Two equal texts score 1.

Used by ``cxrtrek eval --bertscore-model PATH``; without a path, evaluation leaves BERTScore
out and says so in ``results.json``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cxrtrek.errors import ConfigError

__all__ = ["BERTScorer"]


class BERTScorer:
    """BERTScore F1 with the model in ``folder`` (loaded on first use, CPU)."""

    def __init__(self, folder: str | Path, *, layer: int = -1, batch_size: int = 16,
                 max_length: int = 256) -> None:
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise ConfigError(f"BERTScore model {str(self.folder)!r} is not a folder; expected "
                              "a local model saved with save_pretrained (nothing is "
                              "downloaded)")
        self.layer = layer
        self.batch_size = batch_size
        self.max_length = max_length
        self._model: Any = None
        self._tokenizer: Any = None

    def describe(self) -> str:
        return (f"BERTScore F1 with {self.folder.name} (layer {self.layer}, no idf, no "
                "baseline rescaling)")

    def _load(self) -> None:
        if self._model is not None:
            return
        from transformers import AutoModel, AutoTokenizer

        try:
            self._tokenizer = AutoTokenizer.from_pretrained(self.folder, local_files_only=True)
            self._model = AutoModel.from_pretrained(self.folder, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot load a BERTScore model from {self.folder}: {exc}") \
                from exc
        self._model.eval()

    def _embed(self, texts: Sequence[str]) -> list[Any]:
        import torch

        out: list[Any] = []
        for start in range(0, len(texts), self.batch_size):
            batch = [t if t.strip() else "." for t in texts[start:start + self.batch_size]]
            enc = self._tokenizer(batch, return_tensors="pt", padding=True, truncation=True,
                                  max_length=self.max_length,
                                  return_special_tokens_mask=True)
            special = enc.pop("special_tokens_mask")
            with torch.no_grad():
                hidden = self._model(**enc, output_hidden_states=True).hidden_states[self.layer]
            hidden = torch.nn.functional.normalize(hidden.float(), dim=-1)
            keep = enc["attention_mask"].bool() & ~special.bool()
            for i in range(hidden.shape[0]):
                vec = hidden[i][keep[i]]
                out.append(vec if vec.shape[0] else hidden[i][enc["attention_mask"][i].bool()])
        return out

    def f1(self, candidates: Sequence[str], references: Sequence[str]) -> list[float]:
        """BERTScore F1 of each candidate against its reference (0 for an empty candidate
        against a non-empty reference)."""
        if len(candidates) != len(references):
            raise ValueError(f"expected as many candidates as references; got "
                             f"{len(candidates)} and {len(references)}")
        if not candidates:
            return []
        self._load()
        cands, refs = self._embed(candidates), self._embed(references)
        scores: list[float] = []
        for text, ref_text, c, r in zip(candidates, references, cands, refs, strict=True):
            if text.strip() == ref_text.strip():
                scores.append(1.0)
                continue
            if not text.strip() or not ref_text.strip():
                scores.append(0.0)
                continue
            sim = c @ r.T
            precision = float(sim.max(dim=1).values.mean())
            recall = float(sim.max(dim=0).values.mean())
            total = precision + recall
            scores.append(2 * precision * recall / total if total > 0 else 0.0)
        return scores
