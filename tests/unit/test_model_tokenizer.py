"""The shipped tokenizer: round trips, atomic special tokens, a reproducible build."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from cxrtrek.model.corpus import corpus_lines
from cxrtrek.model.tokenizer import (
    BOX_TOKENS,
    SPECIAL_TOKENS,
    CXRTrekTokenizer,
    build_tokenizer,
    default_tokenizer_path,
)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tok() -> CXRTrekTokenizer:
    return CXRTrekTokenizer.default()


@pytest.mark.parametrize("text", [
    "The heart is mildly enlarged. Small right pleural effusion.",
    "Respond with yes or no only: is there a 4 mm nodule?  Tabs\tand\nnewlines.",
    "Ünïcödé, émphysème, 肺 and 🫁 survive byte-level BPE.",
    "",
])
def test_round_trip(tok: CXRTrekTokenizer, text: str) -> None:
    assert tok.decode(tok.encode(text)) == text


def test_special_tokens_are_atomic(tok: CXRTrekTokenizer) -> None:
    for t in (*SPECIAL_TOKENS, *BOX_TOKENS):
        assert tok.encode(t) == [tok.token_id(t)]
        assert tok.encode(f"x{t}y").count(tok.token_id(t)) == 1
    assert [tok.token_id(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))


def test_decode_drops_structure_keeps_boxes(tok: CXRTrekTokenizer) -> None:
    text = "<stage_3> <|ref|> heart <|/ref|> <|box|>(10, 20), (30, 40)<|/box|><|end|>"
    assert tok.decode(tok.encode(text)) == \
        " <|ref|> heart <|/ref|> <|box|>(10, 20), (30, 40)<|/box|>"
    assert tok.decode(tok.encode(text), skip_special_tokens=False) == text


def test_vocabulary_is_small(tok: CXRTrekTokenizer) -> None:
    assert 1000 < len(tok) <= 8192


def test_build_is_deterministic() -> None:
    a = build_tokenizer(corpus_lines(200, seed=1), vocab_size=600).to_str()
    b = build_tokenizer(corpus_lines(200, seed=1), vocab_size=600).to_str()
    assert a == b


def test_shipped_file_is_what_the_script_builds(tmp_path: Path) -> None:
    out = tmp_path / "tokenizer.json"
    subprocess.run([sys.executable, str(REPO / "scripts" / "build_tokenizer.py"), "--out",
                    str(out)], check=True, capture_output=True)
    assert out.read_bytes() == default_tokenizer_path().read_bytes()


def test_save_pretrained_is_loadable_by_transformers(tok: CXRTrekTokenizer,
                                                     tmp_path: Path) -> None:
    tok.save_pretrained(tmp_path)
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(tmp_path))
    text = "Current image: <image> Is there an effusion?<|end|>"
    assert hf(text, add_special_tokens=False)["input_ids"] == tok.encode(text)
    assert hf.pad_token == "<pad>" and hf.eos_token == "</s>"
