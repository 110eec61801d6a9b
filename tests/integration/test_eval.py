"""``cxrtrek eval`` end to end: the oracle on the shared sample and on phantom studies scores
100% on every metric it can compute; ablation, compare, workers, Ray, missing images, plots."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from PIL import Image

from cxrtrek.evals.results import EvalResults, load_results, read_rows, summarize
from cxrtrek.evals.runner import EvalConfig, EvalOutcome, evaluate, load_eval_studies, run_eval
from cxrtrek.interfaces.cli import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_png(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_MAGIC
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > 200 and im.size[1] > 200


def assert_all_perfect(results: EvalResults) -> int:
    """Every metric computed, overall and per stage and per question type, is 1.0."""
    checked = 0
    for summary in results.policies.values():
        groups = [summary.overall, *summary.by_stage.values(),
                  *summary.by_question_type.values(), *summary.by_stage_question_type.values()]
        for g in groups:
            assert g.stage_score == pytest.approx(1.0)
            for name, value in g.metrics.items():
                if value is not None:
                    assert value == pytest.approx(1.0), name
                    checked += 1
    return checked


@pytest.fixture(scope="module")
def phantom_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from cxrtrek.data.phantoms import generate

    return generate(4, 3, tmp_path_factory.mktemp("phantoms"), size=128)


@pytest.fixture(scope="module")
def sample_eval(sample_path: Path, tmp_path_factory: pytest.TempPathFactory) -> EvalOutcome:
    config = EvalConfig(data=str(sample_path), allow_missing_images=True)
    return run_eval(config, tmp_path_factory.mktemp("sample-eval"))


def test_oracle_scores_100_on_the_shared_sample(sample_eval: EvalOutcome) -> None:
    results = sample_eval.results
    summary = results.policies["full"]
    assert results.dataset["studies"] == 20
    assert summary.counts["questions"] == summary.counts["ok"] == results.dataset["questions"]
    assert assert_all_perfect(results) > 50
    expected = {"yes_no_acc", "single_choice_acc", "multi_choice_exact", "multi_choice_f1",
                "det_mean_iou", "det_acc50", "bleu1", "bleu4", "rougeL", "finding_f1"}
    assert expected <= {k for k, v in summary.overall.metrics.items() if v is not None}
    assert set(summary.by_stage) == {str(s) for s in range(1, 9)}
    assert summary.propagation.wrong == 0
    assert summary.propagation.runs_all_correct == 20
    assert any("bertscore" in n and "not computed" in n for n in results.notes)


def test_outputs_are_written(sample_eval: EvalOutcome) -> None:
    files = sample_eval.files
    on_disk = load_results(sample_eval.out_dir)
    assert on_disk.policies["full"].overall == sample_eval.results.policies["full"].overall
    rows = read_rows(files["questions"])
    assert len(rows) == sample_eval.results.dataset["questions"]
    first = json.loads(files["questions"].read_text().splitlines()[0])
    for key in ("run", "study_id", "stage", "task_type", "question_type", "reference",
                "prediction", "parse_status", "scores"):
        assert key in first
    assert_png(files["per_stage"])
    # the summary recomputed from the rows on disk is the same
    assert summarize(rows, ["full"])["full"].overall == on_disk.policies["full"].overall


def test_oracle_scores_100_on_phantoms(phantom_data: Path, tmp_path: Path) -> None:
    outcome = run_eval(EvalConfig(data=str(phantom_data)), tmp_path)
    summary = outcome.results.policies["full"]
    assert summary.counts["skipped_missing_image"] == 0
    assert "detection" in summary.by_question_type
    assert assert_all_perfect(outcome.results) > 20


def test_missing_images_are_a_clear_error(sample_path: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["eval", "--data", str(sample_path), "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert code == 2
    assert "cxrtrek eval: error:" in err and "not found under image root" in err
    assert "Traceback" not in err


def test_model_backend_skips_and_counts_missing_images(sample_path: Path,
                                                       tmp_path: Path) -> None:
    config = EvalConfig(data=str(sample_path), backend="inprocess:tiny", limit=2,
                        allow_missing_images=True)
    outcome = run_eval(config, tmp_path)
    summary = outcome.results.policies["full"]
    assert summary.counts["skipped_missing_image"] == summary.counts["questions"] > 0
    assert summary.counts["scored"] == 0 and summary.overall.metrics == {}
    assert any("skipped" in n for n in outcome.results.notes)


def test_ablation_with_three_policies(sample_path: Path, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["eval", "--data", str(sample_path), "--allow-missing-images", "--limit", "3",
                 "--context", "full,retrieved,none", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0
    results = load_results(tmp_path / "results.json")
    assert list(results.policies) == ["full", "retrieved", "none"]
    header = next(line for line in out.splitlines() if "full" in line and "none" in line)
    assert header.index("full") < header.index("retrieved") < header.index("none")
    assert_all_perfect(results)
    assert_png(tmp_path / "ablation.png")
    assert_png(tmp_path / "per_stage.png")
    rows = read_rows(tmp_path / "questions.jsonl")
    assert {r.run for r in rows} == {"full", "retrieved", "none"}
    # every answer perfect under each policy: context changes nothing, paired with none
    effects = results.context_effects
    assert {e.policy for e in effects} == {"full", "retrieved"}
    assert {e.stage for e in effects} >= {"1", "8", "overall"}
    assert all((e.delta, e.low, e.high) == (0.0, 0.0, 0.0) for e in effects)
    assert "context effect" in out


def test_compare_gives_the_right_deltas(sample_eval: EvalOutcome, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    rows = read_rows(sample_eval.files["questions"])
    stage2_yes_no = [r for r in rows if r.stage == 2 and r.question_type == "yes_no"]
    for r in stage2_yes_no[:4]:  # four stage-2 yes/no answers made wrong
        r.scores["yes_no_acc"] = 0.0
    worse = sample_eval.results.model_copy(update={"policies": summarize(rows, ["full"])})
    (tmp_path / "b.json").write_text(worse.model_dump_json())
    code = main(["eval", "compare", str(sample_eval.out_dir), str(tmp_path / "b.json"),
                 "--json"])
    assert code == 0
    deltas = json.loads(capsys.readouterr().out)["deltas"]
    by_key = {(d["stage"], d["metric"]): d["delta"] for d in deltas}
    n2 = sum(r.stage == 2 for r in rows)
    assert by_key[("2", "yes_no_acc")] == pytest.approx(-4 / len(stage2_yes_no))
    assert by_key[("2", "stage_score")] == pytest.approx(-4 / n2)
    assert by_key[("overall", "stage_score")] == pytest.approx(-4 / len(rows))
    assert by_key[("3", "stage_score")] == 0.0
    assert main(["eval", "compare", str(sample_eval.out_dir), str(tmp_path / "b.json")]) == 0
    assert "B - A" in capsys.readouterr().out


def test_workers_give_the_same_rows(sample_path: Path) -> None:
    config = EvalConfig(data=str(sample_path), allow_missing_images=True, limit=4)
    studies = load_eval_studies(config)
    one = evaluate(studies, config)
    two = evaluate(studies, config.model_copy(update={"workers": 2}))
    assert len(one.rows) > 0
    assert [r.model_dump() for r in two.rows] == [r.model_dump() for r in one.rows]


def test_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval"]) == 2
    assert "--data DATASET is required" in capsys.readouterr().err
    assert main(["eval", "compare", "only-one"]) == 2
    assert main(["eval", "--data", "x.json", "--context", "full,sideways"]) == 2
    assert "full, retrieved, none" in capsys.readouterr().err


def test_light_imports() -> None:
    import subprocess

    code = ("import sys, cxrtrek.evals, cxrtrek.interfaces.cli as c, typer.main as t; "
            "t.get_command(c.app); "
            "heavy = [m for m in ('torch', 'matplotlib', 'sacrebleu', 'rouge_score', 'ray', "
            "'transformers', 'langgraph') if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.slow
def test_ray_local_gives_the_same_rows(sample_path: Path) -> None:
    pytest.importorskip("ray")
    config = EvalConfig(data=str(sample_path), allow_missing_images=True, limit=2)
    studies = load_eval_studies(config)
    local = evaluate(studies, config)
    on_ray = evaluate(studies, config.model_copy(update={"ray": "local", "workers": 2}))
    assert [r.model_dump() for r in on_ray.rows] == [r.model_dump() for r in local.rows]
