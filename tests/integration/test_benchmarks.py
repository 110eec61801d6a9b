"""``cxrtrek eval`` on the public benchmarks' layouts: files written here in the VQA-RAD,
SLAKE, ReXVQA, MIMIC-CXR-VQA and ChestAgentBench forms (with images) are recognised, read into
typed questions placed in stages, scored 100% by the oracle on every metric, scored what they
should by a deliberately wrong backend, and refused with one line naming a malformed record."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from cxrtrek.errors import ConfigError, FormatError, MissingImageError
from cxrtrek.evals import runner as runner_mod
from cxrtrek.evals.datasets import BENCHMARK_FORMATS, load_benchmark, recognise
from cxrtrek.evals.results import EvalResults, read_rows
from cxrtrek.evals.runner import EvalConfig, EvalOutcome, run_eval
from cxrtrek.interfaces.cli import main
from cxrtrek.protocol import VLMRequest, split_request_id
from cxrtrek.schema import ChoiceParse, Study, YesNoParse

from .bench_files import WRITERS, Written, write_chestagentbench, write_jsonl, write_vqa_rad

EXPECTED_METRICS = {
    "vqa-rad": {"closed_acc", "open_recall"},
    "slake": {"closed_acc", "open_recall"},
    "rexvqa": {"acc", "closed_acc"},
    "mimic-cxr-vqa": {"acc", "closed_acc", "open_recall"},
    "chestagentbench": {"acc", "closed_acc"},
}
EXPECTED_CATEGORIES = {
    "rexvqa": {"Presence Assessment", "Location Analysis", "Negation Detection",
               "Differential Diagnosis", "Geometric Information"},
    "chestagentbench": {"detection", "classification", "localization", "comparison",
                        "relationship", "diagnosis", "characterization"},
    "mimic-cxr-vqa": {"anatomy", "attribute", "presence", "abnormality", "plane", "gender",
                      "size"},
}


@pytest.fixture(scope="module", autouse=True)
def _no_plots() -> Iterator[None]:
    """The plots are tested with the CXRTrek sample (test_eval.py); here they would only cost
    seconds per evaluation."""
    import cxrtrek.evals.plots as plots

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(plots, "plot_per_stage", lambda results, path: Path(path))
        mp.setattr(plots, "plot_ablation", lambda results, path: Path(path))
        yield


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Written]:
    root = tmp_path_factory.mktemp("benchmarks")
    out = {}
    for name, write in WRITERS.items():
        (root / name).mkdir()
        out[name] = write(root / name)
    return out


def _config(w: Written, **kw: Any) -> EvalConfig:
    return EvalConfig(data=str(w.path), image_root=str(w.image_root) if w.image_root else None,
                      **w.options, **kw)


@pytest.fixture(scope="module")
def oracle(files: dict[str, Written],
           tmp_path_factory: pytest.TempPathFactory) -> dict[str, EvalOutcome]:
    out = tmp_path_factory.mktemp("oracle")
    return {name: run_eval(_config(w, contexts=("none", "full")), out / name)
            for name, w in files.items()}


def _assert_perfect(results: EvalResults) -> int:
    checked = 0
    for summary in results.policies.values():
        for g in [summary.overall, *summary.by_stage.values(),
                  *summary.by_question_type.values()]:
            assert g.stage_score == pytest.approx(1.0)
            for name, value in g.metrics.items():
                if value is not None:
                    assert value == pytest.approx(1.0), name
                    checked += 1
        bench = summary.benchmark
        assert bench is not None
        for name, value in bench.values().items():
            assert value == pytest.approx(1.0), name
            checked += 1
    return checked


# --- reading ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", BENCHMARK_FORMATS)
def test_each_format_is_recognised_and_read_with_its_skips(files: dict[str, Written],
                                                           name: str) -> None:
    w = files[name]
    assert len(w.records) >= 20 + sum(w.skipped.values())
    assert recognise(w.path) == name
    bench = load_benchmark(w.path, image_root=w.image_root, **w.options)
    assert bench.format == name
    assert bench.records == len(w.records)
    assert len(bench.studies) == len(bench.tags) == w.kept >= 20
    assert bench.skipped == w.skipped
    for study, tag in zip(bench.studies, bench.tags, strict=True):
        assert study.study_id == tag.record and study.source == name
        assert len(study.questions) == 1 and study.images
        assert all(Path(str(ref.path)).is_file() for ref in study.images)
    line = bench.report()
    assert "\n" not in line and f"{w.kept} question(s) kept" in line
    for reason in w.skipped:
        assert reason in line


def test_recognise_knows_a_cxrtrek_file_and_names_the_fields_of_an_unknown_one(
        tmp_path: Path) -> None:
    from cxrtrek.data.phantoms import generate

    assert recognise(generate(1, 3, tmp_path / "ph", size=128)) == "cxrtrek"
    odd = tmp_path / "odd.json"
    odd.write_text(json.dumps([{"prompt": "x", "label": 1}]))
    with pytest.raises(FormatError, match=r"odd.json: cannot tell the format .*label, prompt"):
        recognise(odd)


def test_vqa_rad_types_stages_and_spellings(files: dict[str, Written]) -> None:
    bench = load_benchmark(files["vqa-rad"].path, organ="chest")
    by_q = {s.questions[0].text: (s, t) for s, t in zip(bench.studies, bench.tags, strict=True)}
    # closed yes/no in any spelling ("Yes", "no", "CLOSED ", "closed") -> yes_no
    for text, value in [("Is there a pneumothorax?", True),
                        ("Is there evidence of a pleural effusion?", False),
                        ("Is the heart enlarged?", True), ("Is this a PA film?", False)]:
        study, tag = by_q[text]
        assert study.questions[0].qtype == "yes_no"
        assert study.references["q000"].parsed == YesNoParse(value=value)
        assert tag.answer_type == "closed" and tag.scoring == "yes_no"
    # closed but not yes/no: captioning, scored as closed text; open: captioning
    study, tag = by_q["Which side is the effusion on?"]
    assert (study.questions[0].qtype, tag.scoring, study.questions[0].stage) == (
        "captioning", "closed_text", 3)
    study, tag = by_q["How many nodules are seen?"]
    assert (study.questions[0].qtype, tag.scoring, tag.answers) == ("captioning", "open_text",
                                                                    ["2"])
    # the stage rule: MODALITY -> 1, PRES -> 2, "PRES, POS" -> the later (3), OTHER -> 2
    assert by_q["What imaging modality was used?"][0].questions[0].stage == 1
    assert by_q["Is there a pneumothorax?"][0].questions[0].stage == 2
    assert by_q["Is the mass on the left or right?"][0].questions[0].stage == 3
    assert by_q["Is the mass on the left or right?"][1].categories == ["PRES", "POS"]
    assert by_q["What is abnormal about the mediastinum?"][0].questions[0].stage == 2
    # the split: test questions are phrase_type test_*
    test = load_benchmark(files["vqa-rad"].path, organ="CHEST", split="test")
    assert len(test.studies) == 4 and test.skipped["train question, not test"] == 20


def test_jsonl_and_json_forms_read_alike(files: dict[str, Written], tmp_path: Path) -> None:
    jsonl = write_vqa_rad(tmp_path / "rad", jsonl=True)
    a = load_benchmark(files["vqa-rad"].path, organ="CHEST")
    b = load_benchmark(jsonl.path, organ="CHEST")
    assert [s.questions for s in a.studies] == [s.questions for s in b.studies]
    assert a.tags == b.tags
    arr = write_chestagentbench(tmp_path / "cab", as_json=True)
    c = load_benchmark(files["chestagentbench"].path)
    d = load_benchmark(arr.path)
    assert [s.questions for s in c.studies] == [s.questions for s in d.studies]
    # ReXVQA as JSONL (ids from "id" instead of the object's keys)
    rex = files["rexvqa"]
    keyed = json.loads(rex.path.read_text())
    lines = write_jsonl([{**v, "id": k} for k, v in keyed.items()],
                        rex.path.with_name("test_vqa_data.jsonl"))
    e, f = load_benchmark(rex.path), load_benchmark(lines)
    assert [s.study_id for s in e.studies] == [s.study_id for s in f.studies] == list(keyed)


def test_choice_and_set_questions(files: dict[str, Written]) -> None:
    rex = load_benchmark(files["rexvqa"].path)
    q = rex.studies[0].questions[0]
    assert q.qtype == "single-choice" and len(q.options) == 4 and "Options:\nA." in q.text
    assert rex.studies[0].references["q000"].parsed == ChoiceParse(
        labels=["C"], selected=["C. No pleural effusion"])
    assert [s.questions[0].stage for s in rex.studies[:5]] == [2, 3, 2, 7, 3]
    cab = load_benchmark(files["chestagentbench"].path)
    assert {s.questions[0].qtype for s in cab.studies} == {"single-choice"}
    assert all(len(s.questions[0].options) == 6 for s in cab.studies)
    assert cab.tags[0].categories == ["detection", "localization", "characterization"]
    assert [s.questions[0].stage for s in cab.studies[:5]] == [3, 4, 4, 7, 7]
    assert len(cab.studies[1].images) == 2
    w = files["mimic-cxr-vqa"]
    mimic = load_benchmark(w.path, image_root=w.image_root, split="test")
    kinds = {(t.scoring, t.answer_type) for t in mimic.tags}
    assert kinds == {("yes_no", "closed"), ("answer_set", "closed"), ("answer_set", "open")}
    empty = next(s for s, t in zip(mimic.studies, mimic.tags, strict=True)
                 if t.scoring == "answer_set" and not t.answers)
    assert empty.references["q000"].text == "none"
    assert {s.questions[0].stage for s in mimic.studies} == {1, 2, 3}


def test_options_that_do_not_apply_are_refused(files: dict[str, Written]) -> None:
    with pytest.raises(ConfigError, match="--organ applies to VQA-RAD"):
        load_benchmark(files["slake"].path, organ="CHEST")
    with pytest.raises(ConfigError, match="--split applies to VQA-RAD and MIMIC-CXR-VQA"):
        load_benchmark(files["chestagentbench"].path, split="test")


def test_a_missing_image_is_an_error_naming_the_record(files: dict[str, Written],
                                                       tmp_path: Path) -> None:
    w = files["mimic-cxr-vqa"]
    with pytest.raises(MissingImageError, match=r"record 0 \(idx 13280\): image 'p10/"):
        load_benchmark(w.path, split="test")  # the image root is MIMIC-CXR-JPG's files/
    bench = load_benchmark(w.path, split="test", allow_missing_images=True)
    assert len(bench.studies) == 24


# --- malformed records: one line naming the record --------------------------------------------


MALFORMED: dict[str, tuple[Callable[[dict[str, Any]], None], str]] = {
    "vqa-rad": (lambda r: r.update(answer_type="MAYBE"),
                r"record 3 \(qid 104\): not a VQA-RAD record: answer_type: expected CLOSED or "
                r"OPEN, found 'MAYBE'"),
    "slake": (lambda r: r.pop("question"),
              r"record 3 \(qid 4\): not a SLAKE record: field 'question' is missing"),
    "rexvqa": (lambda r: r.update(correct_answer="??"),
               r"record 3 \(key GRDN1003_differential_diagnosis_3\): not a ReXVQA record: "
               r"correct_answer: expected an option letter, found '\?\?'"),
    "mimic-cxr-vqa": (lambda r: r.update(answer="Will be generated by "
                                                "dataset_builder/generate_answer.py"),
                      r"record 3 \(idx 13283\): not a MIMIC-CXR-VQA record: field 'answer': "
                      r"Value error, expected the list of answers of a built file"),
    "chestagentbench": (lambda r: r.update(images=[1, 2]),
                        r"record 3 \(question_id 2360_8353802248295\): not a ChestAgentBench "
                        r"record: field 'images.list\[str\].0'"),
}


@pytest.mark.parametrize("name", BENCHMARK_FORMATS)
def test_a_malformed_record_gives_one_error_line_naming_it(
        files: dict[str, Written], name: str, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    w = files[name]
    spoil, pattern = MALFORMED[name]
    text = w.path.read_text(encoding="utf-8")
    bad = w.path.with_name("bad" + w.path.suffix)
    if w.path.suffix == ".jsonl":
        lines = text.splitlines()
        rec = json.loads(lines[3])
        spoil(rec)
        lines[3] = json.dumps(rec)
        bad.write_text("\n".join(lines) + "\n", encoding="utf-8")
    else:
        data = json.loads(text)
        rec = data[list(data)[3]] if isinstance(data, dict) else data[3]
        spoil(rec)
        bad.write_text(json.dumps(data), encoding="utf-8")
    args = ["eval", "--data", str(bad), "--out", str(tmp_path / "out")]
    if w.image_root is not None:
        args += ["--image-root", str(w.image_root)]
    assert main(args) == 2
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("cxrtrek eval: error: ") and str(bad) in err
    assert re.search(pattern, err), err
    assert "Traceback" not in err


# --- scoring: the oracle, a wrong backend, comparisons ------------------------------------------


@pytest.mark.parametrize("name", BENCHMARK_FORMATS)
def test_the_oracle_scores_100_on_every_metric(oracle: dict[str, EvalOutcome],
                                               files: dict[str, Written], name: str) -> None:
    results = oracle[name].results
    assert results.dataset["format"] == name
    assert results.dataset["kept"] == files[name].kept
    assert results.dataset["skipped"] == files[name].skipped
    assert _assert_perfect(results) > 10
    for policy in ("none", "full"):
        bench = results.policies[policy].benchmark
        assert bench is not None and bench.n == files[name].kept
        assert set(bench.metrics) == EXPECTED_METRICS[name]
        if name in EXPECTED_CATEGORIES:
            assert set(bench.by_category) == EXPECTED_CATEGORIES[name]
    assert any(n.startswith(f"{results.dataset['benchmark']}: ") for n in results.notes)
    rows = read_rows(oracle[name].files["questions"])
    assert len(rows) == 2 * files[name].kept
    assert all(r.benchmark is not None and r.benchmark.benchmark == name for r in rows)


def _reference_of(studies: list[Study]) -> Callable[[VLMRequest], Study]:
    def study_of(request: VLMRequest) -> Study:
        run_id = split_request_id(request.request_id)[0]
        m = re.match(r"eval-\w+-(\d{6})-", run_id)
        assert m is not None, run_id
        return studies[int(m.group(1))]

    return study_of


def _wrong_answer(request: VLMRequest, study: Study) -> str:
    """A wrong answer of the right form: the other yes/no, another option, foreign words."""
    ref = study.references["q000"].parsed
    if isinstance(ref, YesNoParse):
        return "No." if ref.value else "Yes."
    if isinstance(ref, ChoiceParse):
        return next(o for o in request.options if not o.startswith(ref.labels[0]))
    return "zebra quartz"


def _scripted_run(monkeypatch: pytest.MonkeyPatch, w: Written, out: Path,
                  answer: Callable[[VLMRequest, Study], str],
                  contexts: tuple[str, ...] = ("none",)) -> EvalOutcome:
    from cxrtrek.backends.scripted import ScriptedBackend

    bench = load_benchmark(w.path, image_root=w.image_root, **w.options)
    study_of = _reference_of(bench.studies)

    def script(request: VLMRequest) -> str:
        if not request.request_id.endswith("/q000"):
            return "No acute abnormality."  # a planned question of a staged reading
        return answer(request, study_of(request))

    backend = ScriptedBackend(script, model_id="wrong-on-purpose")
    monkeypatch.setattr(runner_mod, "make_backend", lambda *a, **k: backend)
    return run_eval(_config(w, backend="http://127.0.0.1:9/v1", contexts=contexts), out)


@pytest.mark.parametrize("name", ["vqa-rad", "chestagentbench", "mimic-cxr-vqa"])
def test_a_wrong_backend_scores_zero(files: dict[str, Written], name: str, tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    outcome = _scripted_run(monkeypatch, files[name], tmp_path, _wrong_answer)
    bench = outcome.results.policies["none"].benchmark
    assert bench is not None and bench.n == files[name].kept
    assert bench.metrics and all(v == 0.0 for v in bench.metrics.values()), bench.metrics
    assert all(c.acc == 0.0 for c in bench.by_category.values())
    overall = outcome.results.policies["none"].overall.metrics
    assert overall.get("yes_no_acc") in (0.0, None)
    assert overall.get("single_choice_acc") in (0.0, None)


def test_a_half_right_backend_scores_its_share_per_category(
        files: dict[str, Written], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Right on even records, wrong on odd ones: ReXVQA's 25 questions cycle through its 5
    tasks, so task k (records k, k+5, ...) is right 3 of 5 times when k is even, else 2."""
    def answer(request: VLMRequest, study: Study) -> str:
        index = int(re.match(r"eval-\w+-(\d{6})-", split_request_id(request.request_id)[0])
                    .group(1))  # type: ignore[union-attr]
        return study.references["q000"].text if index % 2 == 0 else _wrong_answer(request,
                                                                                   study)

    outcome = _scripted_run(monkeypatch, files["rexvqa"], tmp_path, answer,
                            contexts=("none", "full"))
    for policy in ("none", "full"):
        bench = outcome.results.policies[policy].benchmark
        assert bench is not None
        assert bench.metrics["acc"] == pytest.approx(13 / 25)
        tasks = ["Presence Assessment", "Location Analysis", "Negation Detection",
                 "Differential Diagnosis", "Geometric Information"]
        for k, task in enumerate(tasks):
            right = sum(1 for i in range(k, 25, 5) if i % 2 == 0)
            assert bench.by_category[task].acc == pytest.approx(right / 5), task


def test_set_answers_are_scored_as_sets(files: dict[str, Written], tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """MIMIC-CXR-VQA list answers: another order, other separators, other case still match."""
    def answer(request: VLMRequest, study: Study) -> str:
        ref = study.references["q000"].text
        items = [x.strip() for x in ref.split(",")]
        return "None." if ref == "none" else " and ".join(reversed(items)).upper() + "."

    outcome = _scripted_run(monkeypatch, files["mimic-cxr-vqa"], tmp_path, answer)
    bench = outcome.results.policies["none"].benchmark
    assert bench is not None and bench.metrics["acc"] == 1.0
    assert bench.metrics["open_recall"] == 1.0


def test_compare_and_the_cli_show_the_benchmark_scores(
        oracle: dict[str, EvalOutcome], files: dict[str, Written], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    wrong = _scripted_run(monkeypatch, files["chestagentbench"], tmp_path / "wrong",
                          _wrong_answer)
    good = oracle["chestagentbench"].out_dir
    assert main(["eval", "compare", str(good), str(wrong.out_dir), "--json"]) == 0
    deltas = json.loads(capsys.readouterr().out)["deltas"]
    bench = {d["metric"]: d for d in deltas if d["stage"] == "benchmark"}
    assert bench["acc"]["a"] == 1.0 and bench["acc"]["b"] == 0.0 and bench["acc"]["delta"] == -1
    assert bench["acc[diagnosis]"]["delta"] == -1
    # the human-readable run: the benchmark's own table, the skip report
    monkeypatch.undo()
    w = files["vqa-rad"]
    assert main(["eval", "--data", str(w.path), "--organ", "CHEST", "--context", "none,full",
                 "--out", str(tmp_path / "cli")]) == 0
    out = capsys.readouterr().out
    assert "VQA-RAD, scored its own way (%)" in out
    assert "closed_acc" in out and "open_recall" in out and "acc[PRES]" in out
    assert "6 skipped: image_organ" in " ".join(out.split())


def test_staged_mode_reads_the_earlier_stages_before_the_question(
        files: dict[str, Written]) -> None:
    """``full`` on a benchmark question: the stages before its own are planned and run, and
    the question sees their answers; ``none`` asks it alone."""
    from cxrtrek.agent.agent import AgentSettings, CXRTrekAgent
    from cxrtrek.backends.scripted import ScriptedBackend
    from cxrtrek.graph.state import RunSettings

    bench = load_benchmark(files["chestagentbench"].path)
    study = bench.studies[3]  # diagnosis: stage 7
    assert study.questions[0].stage == 7
    for mode, context, stages_asked in [("staged", "full", [1, 1, 2, 4, 6, 7]),
                                        ("dataset", "none", [7])]:
        backend = ScriptedBackend(lambda r: "B" if r.request_id.endswith("/q000")
                                  else "No acute abnormality.")
        agent = CXRTrekAgent(backend, settings=AgentSettings(checkpoint_db=":memory:",
                                                             trace=False))
        report = agent.run(study, settings=RunSettings(mode=mode, context=context))
        assert report.status == "completed"
        asked = [r.stage for r in backend.requests]
        assert asked == stages_asked
        last = backend.requests[-1]
        assert last.request_id.endswith("/q000")
        assert {c.stage for c in last.context} == set(stages_asked[:-1])
