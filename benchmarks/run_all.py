"""Run every benchmark script of this folder (``bench_*.py``) and print their figures.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/run_all.py [--only graph,eval] [--full]
                                                             [--timeout 900]

Each script runs in its own process with this interpreter, one after the other (benchmarks
on a shared machine must not compete with each other). A script whose ``--help`` offers
``--quick`` gets it unless ``--full`` is given. Its output is printed as it ran, then a summary
table: script, exit status, seconds. Exits 1 when any script failed or timed out.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def scripts(only: set[str] | None) -> list[Path]:
    """The benchmark scripts, by name (``bench_graph.py`` is ``graph``)."""
    found = sorted(HERE.glob("bench_*.py"))
    if only:
        found = [p for p in found if p.stem.removeprefix("bench_") in only]
    return found


def has_quick(script: Path, env: dict[str, str]) -> bool:
    """Whether the script's ``--help`` lists ``--quick``."""
    try:
        out = subprocess.run([sys.executable, str(script), "--help"], capture_output=True,
                             text=True, timeout=120, env=env)
    except subprocess.TimeoutExpired:
        return False
    return "--quick" in out.stdout


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", help="comma-separated names (graph, eval, memory, ...)")
    parser.add_argument("--full", action="store_true", help="do not pass --quick")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per script")
    args = parser.parse_args(argv)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE.parent),
                                                       os.environ.get("PYTHONPATH")]))}
    only = {x.strip() for x in args.only.split(",")} if args.only else None
    summary: list[tuple[str, str, float]] = []
    out = sys.stdout
    for script in scripts(only):
        cmd = [sys.executable, str(script)]
        if not args.full and has_quick(script, env):
            cmd.append("--quick")
        out.write(f"\n=== {script.name}  ({' '.join(cmd[1:])})\n")
        out.flush()
        started = time.perf_counter()
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout,
                                  env=env, cwd=HERE.parent)
            status = "ok" if done.returncode == 0 else f"exit {done.returncode}"
            out.write(done.stdout)
            if done.returncode != 0:
                out.write(done.stderr[-3000:])
        except subprocess.TimeoutExpired as exc:
            status = f"timed out after {args.timeout:.0f} s"
            out.write(exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes)
                      else (exc.stdout or ""))
        summary.append((script.name, status, time.perf_counter() - started))
    out.write("\n=== summary\n")
    width = max((len(n) for n, _, _ in summary), default=10)
    for name, status, secs in summary:
        out.write(f"{name:<{width}}  {status:<24} {secs:8.1f} s\n")
    return 0 if all(s == "ok" for _, s, _ in summary) else 1


if __name__ == "__main__":
    raise SystemExit(main())
