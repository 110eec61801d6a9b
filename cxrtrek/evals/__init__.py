"""Evaluation: metrics, the runner that reads a dataset with the agent, reports and plots.

::

    from cxrtrek.evals import EvalConfig, run_eval, compare_results, load_results

    outcome = run_eval(EvalConfig(data="data.json", contexts=("full", "none")), "eval/")
    outcome.results.policies["full"].by_stage["2"].metrics["yes_no_acc"]

Modules: :mod:`~cxrtrek.evals.metrics` (per-question scores, metric definitions),
:mod:`~cxrtrek.labeler` (not in this folder, since a reading uses it too: the 14 CheXpert
observations, negation- and uncertainty-aware), :mod:`~cxrtrek.evals.results` (rows,
summaries, comparison),
:mod:`~cxrtrek.evals.runner` (asyncio, worker processes, Ray), :mod:`~cxrtrek.evals.plots`,
:mod:`~cxrtrek.evals.bertscore` (optional, local model only), :mod:`~cxrtrek.evals.datasets`
(readers of VQA-RAD, SLAKE, ReXVQA, MIMIC-CXR-VQA and ChestAgentBench) and
:mod:`~cxrtrek.evals.benchmark_metrics` (each benchmark's own scores); for phantom data and
CXRTrekNet checkpoints: :mod:`~cxrtrek.evals.phantom_eval` (held-out phantoms beside
baselines), :mod:`~cxrtrek.evals.describe` (image descriptions against the truth) and
:mod:`~cxrtrek.evals.grounding` (whether answers depend on the image). Importing this package
is light: sacrebleu, rouge-score, matplotlib, Ray and transformers load when used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cxrtrek._lazy import lazy_exports

_EXPORTS: dict[str, str] = {
    "EvalConfig": "cxrtrek.evals.runner",
    "EvalOutcome": "cxrtrek.evals.runner",
    "evaluate": "cxrtrek.evals.runner",
    "run_eval": "cxrtrek.evals.runner",
    "EvalResults": "cxrtrek.evals.results",
    "QuestionRow": "cxrtrek.evals.results",
    "compare_results": "cxrtrek.evals.results",
    "load_results": "cxrtrek.evals.results",
    "summarize": "cxrtrek.evals.results",
    "score_answer": "cxrtrek.evals.metrics",
    "label_text": "cxrtrek.labeler",
    "load_benchmark": "cxrtrek.evals.datasets",
}

__all__ = [
    "EvalConfig",
    "EvalOutcome",
    "EvalResults",
    "QuestionRow",
    "compare_results",
    "evaluate",
    "label_text",
    "load_benchmark",
    "load_results",
    "run_eval",
    "score_answer",
    "summarize",
]

if TYPE_CHECKING:
    from cxrtrek.evals.datasets import load_benchmark
    from cxrtrek.evals.metrics import score_answer
    from cxrtrek.evals.results import (
        EvalResults,
        QuestionRow,
        compare_results,
        load_results,
        summarize,
    )
    from cxrtrek.evals.runner import EvalConfig, EvalOutcome, evaluate, run_eval
    from cxrtrek.labeler import label_text


__getattr__, __dir__ = lazy_exports("cxrtrek.evals", _EXPORTS, globals())
