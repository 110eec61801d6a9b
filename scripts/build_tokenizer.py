"""Build CXRTrekNet's tokenizer and write it into the package (deterministic: same bytes).

    python scripts/build_tokenizer.py [--out cxrtrek/model/presets/tokenizer.json]
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

# One thread for the BPE trainer: the output does not depend on the machine.
os.environ.setdefault("RAYON_NUM_THREADS", "1")

from cxrtrek.model.corpus import corpus_lines
from cxrtrek.model.tokenizer import build_tokenizer, default_tokenizer_path

log = logging.getLogger("build_tokenizer")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=default_tokenizer_path())
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--corpus-size", type=int, default=4000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    tok = build_tokenizer(corpus_lines(args.corpus_size, args.seed), vocab_size=args.vocab_size)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(args.out))
    log.info("wrote %s (%d tokens)", args.out, tok.get_vocab_size(with_added_tokens=True))


if __name__ == "__main__":
    main()
