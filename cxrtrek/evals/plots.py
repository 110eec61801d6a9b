"""PNG plots of an evaluation (matplotlib, Agg backend; loaded only when plotting).

* :func:`plot_per_stage`: one panel per metric (and the stage score), stages on the x axis,
  one bar per context policy;
* :func:`plot_ablation`: the stage score of each stage and overall, policies side by side.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from cxrtrek.evals.metrics import METRICS
from cxrtrek.evals.results import EvalResults, GroupSummary
from cxrtrek.stages import STAGES

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["plot_ablation", "plot_per_stage"]

_LABELS = {
    "stage_score": "stage score", "yes_no_acc": "yes/no accuracy",
    "single_choice_acc": "single-choice accuracy", "multi_choice_exact": "multi-choice exact",
    "multi_choice_f1": "multi-choice F1", "det_mean_iou": "detection mean IoU",
    "det_acc50": "detection acc@IoU0.5", "bleu1": "BLEU-1", "bleu4": "BLEU-4",
    "rougeL": "ROUGE-L", "finding_f1": "finding F1 (CheXpert)", "bertscore_f1": "BERTScore F1",
}


def _value(summary: GroupSummary | None, metric: str) -> float | None:
    if summary is None:
        return None
    return summary.stage_score if metric == "stage_score" else summary.metrics.get(metric)


def _bars(ax: Axes, results: EvalResults, metric: str, keys: list[str]) -> None:
    policies = list(results.policies)
    width = 0.8 / max(1, len(policies))
    for k, policy in enumerate(policies):
        summary = results.policies[policy]
        values = [_value(summary.overall if key == "all" else summary.by_stage.get(key), metric)
                  for key in keys]
        xs = [i + (k - (len(policies) - 1) / 2) * width for i in range(len(keys))]
        ax.bar(xs, [100 * v if v is not None else 0.0 for v in values], width,
               label=policy)
        for x, v in zip(xs, values, strict=True):
            if v is None:
                ax.text(x, 1, "n/a", ha="center", va="bottom", fontsize=6, rotation=90)
    ax.set_xticks(range(len(keys)), keys)
    ax.set_ylim(0, 105)
    ax.set_title(_LABELS.get(metric, metric), fontsize=9)
    ax.tick_params(labelsize=7)


def _figure(rows: int, cols: int, size: tuple[float, float]) -> tuple[Figure, list[Axes]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(rows, cols, figsize=size, squeeze=False)
    return fig, [ax for row in axes for ax in row]


def _save(fig: Figure, path: Path) -> Path:
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=110)
    plt.close(fig)
    return path


def plot_per_stage(results: EvalResults, path: str | Path) -> Path:
    """Every metric the evaluation has, by stage (and overall), one bar per policy."""
    present = ["stage_score", *(m for m in METRICS if any(
        m in s.overall.metrics and s.overall.metrics[m] is not None
        for s in results.policies.values()))]
    stages = [str(s.number) for s in STAGES
              if any(str(s.number) in p.by_stage for p in results.policies.values())]
    keys = [*stages, "all"]
    cols = 3
    rows = (len(present) + cols - 1) // cols
    fig, axes = _figure(rows, cols, (4.2 * cols, 2.6 * rows + 0.4))
    for ax, metric in zip(axes, present, strict=False):
        _bars(ax, results, metric, keys)
        ax.set_xlabel("stage", fontsize=7)
        ax.set_ylabel("%", fontsize=7)
    for ax in axes[len(present):]:
        ax.axis("off")
    if len(results.policies) > 1:
        axes[0].legend(fontsize=7, title="context", title_fontsize=7)
    title = f"cxrtrek eval: {results.model_id or 'model'} on {Path(results.dataset['path']).name}"
    fig.suptitle(title, fontsize=10)
    return _save(fig, Path(path))


def plot_ablation(results: EvalResults, path: str | Path) -> Path:
    """The context ablation: stage score per stage and overall, policies side by side."""
    stages = [str(s.number) for s in STAGES
              if any(str(s.number) in p.by_stage for p in results.policies.values())]
    fig, axes = _figure(1, 1, (9.0, 3.6))
    ax = axes[0]
    _bars(ax, results, "stage_score", [*stages, "all"])
    ax.set_xlabel("stage")
    ax.set_ylabel("stage score (%)")
    ax.set_title("context ablation: " + " vs ".join(results.policies), fontsize=10)
    ax.legend(title="context", fontsize=8)
    return _save(fig, Path(path))
