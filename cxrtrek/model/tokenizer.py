"""CXRTrekNet's tokenizer: a byte-level BPE built by the project and shipped with the package.

``scripts/build_tokenizer.py`` trains it on :mod:`cxrtrek.model.corpus` and writes
``cxrtrek/model/presets/tokenizer.json``. Structural tokens (pad, bos, eos, image, chat roles,
end of turn, stage markers) are *special*: atomic, and dropped by ``decode`` by default. Box
markers (``<|ref|>`` ...) are atomic too but part of answers, so ``decode`` keeps them.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

from cxrtrek.errors import ConfigError

__all__ = [
    "BOS",
    "BOX_TOKENS",
    "END",
    "EOS",
    "IMAGE",
    "PAD",
    "ROLE_TOKENS",
    "SPECIAL_TOKENS",
    "STAGE_TOKENS",
    "CXRTrekTokenizer",
    "build_tokenizer",
    "default_tokenizer_path",
]

PAD, BOS, EOS = "<pad>", "<s>", "</s>"
IMAGE = "<image>"
END = "<|end|>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
STAGE_TOKENS = tuple(f"<stage_{i}>" for i in range(1, 9))
BOX_TOKENS = ("<|ref|>", "<|/ref|>", "<|box|>", "<|/box|>")
SPECIAL_TOKENS = (PAD, BOS, EOS, IMAGE, *ROLE_TOKENS, END, *STAGE_TOKENS)
"""Structural tokens, in id order from 0."""

TOKENIZER_FILE = "tokenizer.json"


def default_tokenizer_path() -> Path:
    """The tokenizer shipped in the package."""
    return Path(__file__).parent / "presets" / TOKENIZER_FILE


def build_tokenizer(lines: Iterable[str], vocab_size: int = 4096) -> Tokenizer:
    """Train a byte-level BPE of ``vocab_size`` tokens (special and box tokens included)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(BOX_TOKENS),
        min_frequency=2,
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(lines, trainer=trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in BOX_TOKENS])
    return tok


class CXRTrekTokenizer:
    """A thin, typed wrapper around a :class:`tokenizers.Tokenizer` with the project's tokens."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tok = tokenizer
        missing = [t for t in (*SPECIAL_TOKENS, *BOX_TOKENS) if tokenizer.token_to_id(t) is None]
        if missing:
            raise ConfigError(f"tokenizer lacks the tokens CXRTrekNet needs: {missing}")
        self.pad_id = self.token_id(PAD)
        self.bos_id = self.token_id(BOS)
        self.eos_id = self.token_id(EOS)
        self.end_id = self.token_id(END)
        self.image_id = self.token_id(IMAGE)

    @classmethod
    def from_file(cls, path: str | Path) -> CXRTrekTokenizer:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"expected a tokenizer file at {path}; found none")
        return cls(Tokenizer.from_file(str(path)))

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> CXRTrekTokenizer:
        """Load ``tokenizer.json`` from a model folder."""
        return cls.from_file(Path(folder) / TOKENIZER_FILE)

    @classmethod
    def default(cls) -> CXRTrekTokenizer:
        """The tokenizer shipped in the package."""
        return cls.from_file(default_tokenizer_path())

    @classmethod
    def extend(cls, tokenizer: Tokenizer) -> CXRTrekTokenizer:
        """Add the project's tokens to another model's tokenizer (e.g. a pretrained LM's)."""
        tokenizer.add_special_tokens(
            [AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS]
        )
        tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in BOX_TOKENS])
        return cls(tokenizer)

    @property
    def backend(self) -> Tokenizer:
        return self._tok

    def __len__(self) -> int:
        return int(self._tok.get_vocab_size(with_added_tokens=True))

    def token_id(self, token: str) -> int:
        tid = self._tok.token_to_id(token)
        if tid is None:
            raise ConfigError(f"token {token!r} is not in the tokenizer's vocabulary")
        return int(tid)

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids and each token's (start, end) character offsets in ``text``."""
        enc = self._tok.encode(text, add_special_tokens=False)
        return list(enc.ids), [(int(a), int(b)) for a, b in enc.offsets]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return str(self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens))

    def save_pretrained(self, folder: str | Path) -> None:
        """Write ``tokenizer.json`` and a ``tokenizer_config.json`` that transformers'
        ``PreTrainedTokenizerFast`` understands."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self._tok.save(str(folder / TOKENIZER_FILE))
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": BOS,
            "eos_token": EOS,
            "pad_token": PAD,
            "padding_side": "left",
            "model_max_length": None,
        }
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
