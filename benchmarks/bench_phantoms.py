"""Phantom generation speed: studies per second on one core, PNG encoding included.

Run: ``.venv/bin/python benchmarks/bench_phantoms.py [--n 100] [--size 320]``. Prints one line
with studies/s and images/s (wall clock) and studies per CPU-second (what one core does when
the machine is shared). numpy does no multithreaded work here: the figure is for one core.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

import numpy as np

from cxrtrek.data.phantoms import make_study

log = logging.getLogger("bench_phantoms")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=100, help="studies to generate")
    parser.add_argument("--size", type=int, default=320, help="image size in pixels")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    make_study(np.random.default_rng([args.seed, 10**9]), size=args.size)  # warm caches
    images = questions = 0
    start, cpu_start = time.perf_counter(), time.process_time()
    for i in range(args.n):
        imgs, _truth, record = make_study(np.random.default_rng([args.seed, i]), index=i,
                                          seed=args.seed, size=args.size)
        for im in imgs:
            im.png()
        images += len(imgs)
        questions += len(record.data.content) if record.data else 0
    elapsed = time.perf_counter() - start
    cpu = time.process_time() - cpu_start
    sys.stdout.write(f"{args.n / elapsed:.1f} studies/s ({images / elapsed:.1f} images/s, "
                     f"{questions / args.n:.1f} questions/study) at {args.size} px; "
                     f"{args.n / cpu:.1f} studies per CPU-second\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
