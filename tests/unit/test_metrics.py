"""Each metric on hand-checked examples, and the aggregation and comparison of rows."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from cxrtrek.evals.metrics import (
    box_scores,
    choice_scores,
    corpus_bleu,
    finding_counts,
    finding_f1,
    match_boxes,
    rouge_l,
    score_answer,
    sentence_bleu,
    set_f1,
    yes_no_value,
)
from cxrtrek.evals.results import (
    EvalResults,
    QuestionRow,
    aggregate,
    compare_results,
    context_effects,
    propagation,
    summarize,
)
from cxrtrek.schema import (
    Answer,
    BBox,
    BoxesParse,
    ChoiceParse,
    QType,
    ReportParse,
    TextParse,
    Unparsed,
    YesNoParse,
)

E = math.exp(-1)  # BLEU brevity penalty of a 3-token answer to a 6-token reference


def box(*v: float) -> BBox:
    return BBox(x1=v[0], y1=v[1], x2=v[2], y2=v[3])


def ref(parsed: Any, text: str = "ref") -> Answer:
    return Answer(question_id="q", text=text, parsed=parsed)


# --- yes/no and choices ------------------------------------------------------------------------

def test_yes_no_value_from_a_parse_or_a_yes_no_option() -> None:
    assert yes_no_value(YesNoParse(value=True)) is True
    assert yes_no_value(ChoiceParse(labels=["B"], selected=["B. No."])) is False
    assert yes_no_value(ChoiceParse(labels=["A"], selected=["A. Left."])) is None
    assert yes_no_value(Unparsed(reason="x")) is None


def test_yes_no_accuracy() -> None:
    r = ref(ChoiceParse(labels=["A"], selected=["A. Yes."]))
    assert score_answer(QType.YES_NO, YesNoParse(value=True), "Yes.", r).scores == {
        "yes_no_acc": 1.0}
    assert score_answer(QType.YES_NO, YesNoParse(value=False), "No.", r).scores[
        "yes_no_acc"] == 0.0
    assert score_answer(QType.YES_NO, Unparsed(reason="?"), "Maybe", r).scores[
        "yes_no_acc"] == 0.0
    assert score_answer(QType.YES_NO, None, None, r).scores["yes_no_acc"] == 0.0


def test_single_choice_by_label_or_by_text() -> None:
    r = ref(ChoiceParse(labels=["B"], selected=["B. Antero-posterior."]))
    assert choice_scores(ChoiceParse(labels=["B"], selected=["B. AP"]), r.parsed) == (1.0, 1.0)
    assert choice_scores(ChoiceParse(labels=["C"], selected=["C. PA"]), r.parsed)[0] == 0.0
    unlabelled = ref(ChoiceParse(labels=[""], selected=["Antero-posterior."]))
    assert choice_scores(ChoiceParse(labels=[""], selected=["antero-posterior"]),
                         unlabelled.parsed) == (1.0, 1.0)
    assert score_answer(QType.SINGLE_CHOICE, TextParse(text="B"), "B", r).scores == {
        "single_choice_acc": 0.0}


def test_multi_choice_exact_and_f1() -> None:
    r = ref(ChoiceParse(labels=["A", "B", "C"], selected=["A. x", "B. y", "C. z"]))
    got = score_answer(QType.MULTI_CHOICE, ChoiceParse(labels=["A", "C"],
                                                       selected=["A. x", "C. z"]), "A, C", r)
    # precision 2/2, recall 2/3 -> F1 = 2 * 1 * 2/3 / (1 + 2/3) = 0.8
    assert got.scores["multi_choice_exact"] == 0.0
    assert got.scores["multi_choice_f1"] == pytest.approx(0.8)
    full = score_answer(QType.MULTI_CHOICE, r.parsed, "A, B, C", r)
    assert full.scores == {"multi_choice_exact": 1.0, "multi_choice_f1": 1.0}
    assert set_f1(set(), set()) == 1.0 and set_f1({"A"}, {"B"}) == 0.0


# --- boxes ---------------------------------------------------------------------------------------

def test_detection_iou_and_accuracy_at_half() -> None:
    # 10x10 inside 10x20: IoU 100/200 = 0.5 -> a hit at the threshold
    assert box_scores([box(0, 0, 10, 10)], [box(0, 0, 10, 20)]) == (0.5, 1.0)
    # shifted by half a width: 50 / 150 = 1/3 -> a miss
    mean_iou, acc = box_scores([box(0, 0, 10, 10)], [box(5, 0, 15, 10)])
    assert mean_iou == pytest.approx(1 / 3) and acc == 0.0
    # one of two reference boxes found exactly: mean IoU 1/2, not a hit (one box missing)
    assert box_scores([box(0, 0, 10, 10)], [box(0, 0, 10, 10), box(50, 50, 60, 60)]) == (
        0.5, 0.0)
    # matching is one to one, best pairs first, regardless of order
    assert match_boxes([box(50, 50, 60, 60), box(0, 0, 10, 10)],
                       [box(0, 0, 10, 10), box(50, 50, 60, 60)]) == [1.0, 1.0]


def test_detection_scores_of_answers() -> None:
    r = ref(BoxesParse(boxes=[box(10, 10, 30, 30)]))
    assert score_answer(QType.DETECTION, BoxesParse(boxes=[box(10, 10, 30, 30)]), "",
                        r).scores == {"det_mean_iou": 1.0, "det_acc50": 1.0}
    assert score_answer(QType.DETECTION, Unparsed(reason="no box"), "none", r).scores == {
        "det_mean_iou": 0.0, "det_acc50": 0.0}


# --- open text -----------------------------------------------------------------------------------

def test_bleu_by_hand() -> None:
    # every n-gram of "the cat sat" is in the reference; only the brevity penalty counts
    assert sentence_bleu("the cat sat", "the cat sat on the mat", 1) == pytest.approx(E)
    assert sentence_bleu("the cat sat", "the cat sat on the mat", 4) == pytest.approx(E)
    # 2 of 4 unigrams match, no length penalty: BLEU-1 = 0.5
    assert sentence_bleu("the dog sat down", "the cat sat still", 1) == pytest.approx(0.5)
    assert sentence_bleu("No effusion.", "no effusion.", 4) == pytest.approx(1.0)  # lower-cased
    assert corpus_bleu(["Yes.", "No"], ["Yes.", "No"], 4) == pytest.approx(1.0)
    assert sentence_bleu("", "a reference", 1) == 0.0
    with pytest.raises(ValueError, match="as many"):
        corpus_bleu(["a"], ["a", "b"])


def test_rouge_l_by_hand() -> None:
    # LCS 3: precision 3/3, recall 3/6 -> F = 2 * 1 * 0.5 / 1.5
    assert rouge_l("the cat sat", "the cat sat on the mat") == pytest.approx(2 / 3)
    assert rouge_l("No effusion.", "no effusion") == 1.0
    assert rouge_l("", "no effusion") == 0.0


def test_finding_f1_by_hand() -> None:
    counts = finding_counts("Cardiomegaly. No pleural effusion.",
                            "Cardiomegaly and a small pleural effusion.")
    # present in the prediction: cardiomegaly; in the reference: cardiomegaly, effusion
    assert (counts.tp, counts.fp, counts.fn) == (1, 0, 1)
    assert finding_f1(counts.tp, counts.fp, counts.fn) == pytest.approx(2 / 3)
    assert counts.prediction["Pleural Effusion"] == "negative"
    assert finding_f1(0, 0, 0) is None
    assert finding_counts("possible effusion", "effusion").tp == 1  # uncertain counts


def test_report_answers_score_their_sections() -> None:
    r = ref(ReportParse(findings="Small left effusion."), "Small left effusion.")
    got = score_answer(QType.CAPTIONING, ReportParse(findings="Small left effusion."),
                       "Findings: Small left effusion.", r)
    assert got.prediction_text == got.reference_text == "Small left effusion."
    assert got.scores == {"bleu1": 1.0, "bleu4": 1.0, "rougeL": 1.0, "finding_f1": 1.0}
    missing = score_answer(QType.CAPTIONING, None, None, r)
    assert missing.scores["rougeL"] == 0.0 and missing.scores["finding_f1"] == 0.0


# --- aggregation -------------------------------------------------------------------------

def row(**kw: Any) -> QuestionRow:
    base: dict[str, Any] = dict(run="full", run_id="r1", study_id="s", study_index=0,
                                question_index=0, question_id="q0", stage=2,
                                task_type="Findings_Identification", qtype="yes_no",
                                question_type="yes_no", question="?", reference="Yes.",
                                prediction="Yes.", parse_status="ok")
    base.update(kw)
    return QuestionRow(**base)


def test_aggregate_means_corpus_bleu_and_micro_f1() -> None:
    texts = ("Cardiomegaly and a small pleural effusion.", "Cardiomegaly. No pleural effusion.")
    counts = finding_counts(texts[1], texts[0])
    rows = [row(scores={"yes_no_acc": 1.0}), row(question_index=1, scores={"yes_no_acc": 0.0}),
            row(question_index=2, qtype="captioning", question_type="captioning",
                task_type="Findings_Identification",
                scores={"rougeL": 0.5, "bleu1": 0.1, "bleu4": 0.1, "finding_f1": 2 / 3},
                reference_text=texts[0], prediction_text=texts[1], findings=counts),
            row(question_index=3, parse_status="skipped_missing_image", prediction=None)]
    g = aggregate(rows)
    assert g.n == 3  # the skipped row is left out
    assert g.metrics["yes_no_acc"] == 0.5 and g.support["yes_no_acc"] == 2
    assert g.metrics["rougeL"] == 0.5
    assert g.metrics["finding_f1"] == pytest.approx(2 / 3)
    assert g.metrics["bleu1"] == pytest.approx(corpus_bleu([texts[1]], [texts[0]], 1))
    assert "det_mean_iou" not in g.metrics  # no detection question: not a 0
    assert g.stage_score == pytest.approx((1.0 + 0.0 + 0.5) / 3)


def test_propagation_counts_wrong_answers_after_a_wrong_stage() -> None:
    rows = [row(stage=1, qtype="captioning", question_type="captioning",
                task_type="View_Information", correct=False),
            row(stage=2, question_index=1, correct=False, wrong_context=["1:q0"]),
            row(stage=2, question_index=2, correct=True, wrong_context=["1:q0"]),
            row(stage=2, question_index=3, correct=True, run_id="r2"),
            row(stage=3, question_index=4, correct=False, run_id="r2",
                task_type="Attributes_Description")]
    p = propagation(rows)
    assert (p.runs, p.runs_all_correct, p.judged, p.wrong) == (2, 0, 5, 3)
    assert p.first_wrong_stage == {"1": 1, "3": 1}
    # wrong in stages 2-8: two; one of them (r1, stage 2) came after a wrong stage 1
    assert p.wrong_preceded_by_earlier_wrong == pytest.approx(1 / 2)
    assert p.p_wrong_given_earlier_wrong == pytest.approx(1 / 2)
    assert p.p_wrong_given_wrong_context == pytest.approx(1 / 2)


def _results(rows: list[QuestionRow], policies: tuple[str, ...]) -> EvalResults:
    return EvalResults(created_at="now", config={}, dataset={"path": "x.json"},
                       policies=summarize(rows, policies))


def test_compare_gives_stage_deltas(tmp_path: Path) -> None:
    a = _results([row(scores={"yes_no_acc": 1.0}),
                  row(question_index=1, scores={"yes_no_acc": 1.0})], ("full",))
    b = _results([row(scores={"yes_no_acc": 1.0}),
                  row(question_index=1, scores={"yes_no_acc": 0.0})], ("full",))
    cmp = compare_results(a, b)
    d = cmp.of("2", "yes_no_acc")
    assert (d.a, d.b, d.delta) == (1.0, 0.5, -0.5)
    assert cmp.of("overall", "stage_score").delta == -0.5


def test_context_effects_pair_each_question_with_none_s_answer() -> None:
    """The paired difference per stage and overall, an interval around it from resampled
    studies, the same for the same seed; nothing without ``none``."""
    rows = []
    for study in range(6):
        for run, q2, q4 in (("full", 1.0, 0.5), ("none", 1.0, 0.0 if study % 2 else 0.5)):
            rows.append(row(run=run, study_index=study, question_id="q2",
                            scores={"yes_no_acc": q2}))
            rows.append(row(run=run, study_index=study, question_id="q4", question_index=1,
                            stage=4, qtype="captioning", question_type="captioning",
                            scores={"rougeL": q4}))
    # a question only full answered is not paired
    rows.append(row(run="full", study_index=0, question_id="q9", stage=4, scores={
        "yes_no_acc": 0.0}))
    effects = context_effects(rows, ("full", "none"))
    by_stage = {e.stage: e for e in effects}
    assert list(by_stage) == ["2", "4", "overall"]
    assert (by_stage["2"].delta, by_stage["2"].low, by_stage["2"].high) == (0.0, 0.0, 0.0)
    four = by_stage["4"]
    assert (four.questions, four.studies) == (6, 6) and four.delta == pytest.approx(0.25)
    assert 0.0 <= four.low < 0.25 < four.high <= 0.5  # half the studies gain 0.5, half 0
    assert by_stage["overall"].delta == pytest.approx(0.125)
    assert context_effects(rows, ("full", "none")) == effects  # seeded
    assert context_effects(rows, ("full",)) == []
    assert context_effects(rows, ("full", "retrieved", "none"))[0].policy == "full"


# --- BERTScore (a tiny random BERT built here: nothing is downloaded) ------------------------

def _tiny_bert(folder: Path) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    words = "no yes small large left right pleural effusion pneumothorax heart is enlarged ."
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *words.split()])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                            cls_token="[CLS]", sep_token="[SEP]").save_pretrained(folder)
    BertModel(BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1,
                         num_attention_heads=2, intermediate_size=32)).save_pretrained(folder)
    return folder


def test_bertscore_with_a_local_model(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    from cxrtrek.evals.bertscore import BERTScorer

    scorer = BERTScorer(_tiny_bert(tmp_path / "bert"))
    same, other, empty = scorer.f1(["small left pleural effusion", "heart is enlarged", ""],
                                   ["small left pleural effusion", "no pneumothorax", "yes"])
    assert same == 1.0 and empty == 0.0
    assert -1.0 <= other < 1.0


def test_bertscore_needs_a_folder(tmp_path: Path) -> None:
    from cxrtrek.errors import ConfigError
    from cxrtrek.evals.bertscore import BERTScorer

    with pytest.raises(ConfigError, match="nothing is downloaded"):
        BERTScorer(tmp_path / "absent")
