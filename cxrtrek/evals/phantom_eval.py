"""Evaluating a CXRTrekNet checkpoint on held-out phantom studies, beside baselines.

Three measurements, each broken down per finding and set beside a baseline that needs no
image:

- **Closed-ended** (yes/no, single and multiple choice): the dataset's own questions, greedy
  answers parsed with :func:`cxrtrek.parsing.parse_answer` and compared with the parsed
  reference. Baseline: the majority answer of each question group (same target, or same task
  when there is no target), computed on the evaluated split itself, so it is an upper bound
  for any constant answer.
- **Detection**: one detection question for every structure and finding with a box (heart,
  both lungs, focal findings, device tips) in the training template. A hit is IoU >= 0.5 for
  focal findings and devices, >= 0.75 for large structures (heart, lungs). Baseline: the mean
  box of each target over the split.
- **Report**: the findings section of every study, finding mentions extracted by keywords (a
  sentence with a negation mentions nothing) from the answer and the true findings section
  (written from the study's truth, so a study whose questions ask only for the impression
  has one too), micro F1 by finding type and by type with side/zone. Baseline: the constant
  mention set that scores best. Beside it, read by describe-then-answer, the F1 of the
  description restated: a report naming exactly the findings that the model's own
  description of the current image says are present (what its perception supports).

Each question is asked alone (no earlier stages as context), with the images the stage graph
gives its stage: the current image in stages 1-4, the current and the prior from stage 5 on.

``evaluate_phantoms(model_dir, data) -> PhantomEval``; ``benchmarks/eval_demo.py`` runs it.
"""

from __future__ import annotations

import json
import logging
import random
import re
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cxrtrek.parsing import parse_answer
from cxrtrek.schema import BoxesParse, ChoiceParse, Question, Study, YesNoParse

__all__ = [
    "LARGE_STRUCTURES",
    "PhantomEval",
    "box_iou",
    "build_requests",
    "evaluate_phantoms",
    "format_markdown",
    "report_mentions",
    "score",
]

log = logging.getLogger(__name__)

LARGE_STRUCTURES = frozenset({"heart", "cardiomegaly", "right lung", "left lung"})
"""Detection targets scored at IoU >= 0.75 (all others at 0.5)."""

_DET_TEMPLATE = ("[detection] Locate the {x} in the image 1 of the main study, output bounding "
                 "box(s) in the format <|box|>(x1, y1), (x2, y2)<|/box|>.")
_REPORT_QUESTION = "Findings of this study: ______."

_DET_NAMES = {
    "effusion": "pleural effusion", "pneumothorax": "pneumothorax",
    "consolidation": "consolidation", "nodule": "pulmonary nodule", "mass": "pulmonary mass",
    "atelectasis": "atelectasis", "rib_fracture": "rib fracture",
    "endotracheal_tube": "endotracheal tube tip", "central_line": "central venous catheter tip",
}

# keyword -> finding type, for report mentions
_MENTIONS: tuple[tuple[str, str], ...] = (
    ("cardiomegaly", "cardiomegaly"), ("heart is mild", "cardiomegaly"),
    ("heart is moderate", "cardiomegaly"), ("heart is severe", "cardiomegaly"),
    ("pleural effusion", "effusion"), ("pneumothorax", "pneumothorax"),
    ("consolidation", "consolidation"), ("nodule", "nodule"), ("mass", "mass"),
    ("atelectasis", "atelectasis"), ("edema", "edema"), ("fracture", "rib_fracture"),
    ("endotracheal tube", "endotracheal_tube"), ("central venous catheter", "central_line"),
)
_NEGATION = re.compile(r"^\s*(no|there is no|without)\b", re.IGNORECASE)
_SIDE = re.compile(r"\b(right|left|bilateral)\b", re.IGNORECASE)
_ZONE = re.compile(r"\b(upper|middle|lower|perihilar)\b", re.IGNORECASE)


def report_mentions(text: str) -> tuple[set[str], set[str]]:
    """Finding types mentioned positively in a report, and the same with side and zone.

    Sentences are split on full stops; a sentence opening with a negation mentions nothing;
    the part after "Compared with the prior study" (changes) is ignored.
    """
    text = re.split(r"Compared with the prior study", text, maxsplit=1)[0]
    kinds: set[str] = set()
    detailed: set[str] = set()
    for sentence in re.split(r"(?<=[.;])\s+", text):
        if not sentence.strip() or _NEGATION.match(sentence):
            continue
        low = sentence.lower()
        for key, kind in _MENTIONS:
            if key in low and kind not in kinds:
                kinds.add(kind)
                side = _SIDE.search(low)
                zone = _ZONE.search(low)
                where = [m.group(1) for m in (side, zone) if m is not None
                         and kind not in ("cardiomegaly", "endotracheal_tube")]
                detailed.add(":".join([kind, *where]))
    return kinds, detailed


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two ``[x1, y1, x2, y2]`` boxes."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _f1(pairs: Iterable[tuple[set[str], set[str]]]) -> float:
    tp = fp = fn = 0
    for pred, true in pairs:
        tp += len(pred & true)
        fp += len(pred - true)
        fn += len(true - pred)
    return 2 * tp / (2 * tp + fp + fn) if tp else 0.0


def _best_constant(truths: Sequence[set[str]]) -> tuple[set[str], float]:
    """Greedy: the constant mention set with the best micro F1 against ``truths``."""
    counts = Counter(m for t in truths for m in t)
    chosen: set[str] = set()
    best = 0.0
    for mention, _ in counts.most_common():
        trial = chosen | {mention}
        score = _f1((trial, t) for t in truths)
        if score > best:
            chosen, best = trial, score
    return chosen, best


@dataclass
class _Tally:
    n: int = 0
    model: int = 0
    baseline: int = 0

    def add(self, model_ok: bool, baseline_ok: bool) -> None:
        self.n += 1
        self.model += int(model_ok)
        self.baseline += int(baseline_ok)

    def row(self) -> dict[str, float | int]:
        return {"n": self.n, "model": self.model / max(self.n, 1),
                "baseline": self.baseline / max(self.n, 1)}


@dataclass
class PhantomEval:
    """Every figure of one evaluation (JSON-ready through :meth:`as_dict`)."""

    studies: int
    closed: dict[str, dict[str, float | int]] = field(default_factory=dict)
    detection: dict[str, dict[str, float | int]] = field(default_factory=dict)
    report: dict[str, float] = field(default_factory=dict)
    unparsed: dict[str, int] = field(default_factory=dict)
    wall_s: float = 0.0
    examples: list[dict[str, str]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"studies": self.studies, "closed": self.closed, "detection": self.detection,
                "report": self.report, "unparsed": self.unparsed, "wall_s": self.wall_s,
                "examples": self.examples}


def _group(q: Question) -> str:
    if q.target:
        m = re.search(r"\[(.+)\]", q.target)
        return m.group(1) if m else q.target
    return q.task_type


def _closed_key(parsed: Any) -> str | None:
    if isinstance(parsed, YesNoParse):
        return "yes" if parsed.value else "no"
    if isinstance(parsed, ChoiceParse):
        return "|".join(sorted(parsed.selected))
    return None


def _option_text(label_text: str) -> str:
    return re.sub(r"^[A-H]\.\s*", "", label_text).rstrip(".").strip().lower()


def _load_truth(data: Path) -> dict[str, dict[str, Any]]:
    folder = data.parent if data.is_file() else data
    out: dict[str, dict[str, Any]] = {}
    for line in (folder / "truth.jsonl").read_text(encoding="utf-8").splitlines():
        if line.strip():
            t = json.loads(line)
            out[f"{t['patient_id']}/{t['study_id']}"] = t
    return out


def _det_targets(t: dict[str, Any]) -> list[tuple[str, list[list[float]]]]:
    out: list[tuple[str, list[list[float]]]] = [
        ("heart", [t["heart_box"]]), ("right lung", [t["right_lung_box"]]),
        ("left lung", [t["left_lung_box"]])]
    for f in t.get("findings", []):
        if f["kind"] in _DET_NAMES and f.get("boxes"):
            out.append((_DET_NAMES[f["kind"]], f["boxes"]))
    for d in t.get("devices", []):
        out.append((_DET_NAMES[d["kind"]], [d["box"]]))
    return out


def evaluate_phantoms(model_dir: str | Path, data: str | Path, *, max_studies: int | None = None,
                      max_closed: int | None = None, batch_size: int = 32,
                      progress: bool = True, describe: bool | None = None,
                      constrain_choices: bool | None = None,
                      dense_head: bool | None = None,
                      quote_boxes: bool | None = None,
                      free_text_samples: int | None = None,
                      hold_closed: bool | None = None,
                      assemble_reports: bool | None = None) -> PhantomEval:
    """Evaluate the model folder on a phantom dataset (``phantoms.json`` with ``truth.jsonl``).

    ``describe``: ask every question by describe-then-answer, as a reading does (the model
    first describes each image alone; each question then sees its images' descriptions);
    None: as the checkpoint prefers (its config's ``describe_first``). ``constrain_choices``:
    answer single-choice questions by their likeliest option (see
    :class:`~cxrtrek.backends.inprocess.InProcessBackend`); None: as the checkpoint prefers.
    ``dense_head``: a model's dense head writes its kinds of each image description (same
    class); None: whenever the model has one. ``quote_boxes``: detection answers quote the
    boxes of their image's description (same class); ``free_text_samples``: reports are chosen
    among the greedy one and this many samples by agreement with the description (same
    class); ``hold_closed``: closed questions that the descriptions decide are answered from
    them (same class); ``assemble_reports``: a report no candidate agrees with the description
    is assembled from their sentences that do (same class); None: as the checkpoint
    prefers."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from cxrtrek.backends.inprocess import InProcessBackend
    from cxrtrek.data.cxrtrek import load_studies

    started = time.monotonic()
    data = Path(data)
    path = data / "phantoms.json" if data.is_dir() else data
    studies: list[Study] = load_studies(path)[:max_studies]
    truths = _load_truth(path)
    backend = InProcessBackend.load(model_dir, device="cpu", dtype="float32",
                                    max_batch_size=batch_size,
                                    constrain_choices=constrain_choices,
                                    dense_head=dense_head, quote_boxes=quote_boxes,
                                    free_text_samples=free_text_samples,
                                    hold_closed=hold_closed,
                                    assemble_reports=assemble_reports)

    requests, meta = build_requests(studies, truths, max_closed=max_closed)
    if describe is None:
        describe = backend.describes_first
    if describe:
        requests = _described(backend, requests, batch_size)
    answers: list[str] = []
    bar = Progress(TextColumn("[bold]eval"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn(), disable=not progress)
    # sort by answer length so that a batch decodes about as long as its longest member
    order = sorted(range(len(requests)), key=lambda i: requests[i].max_new_tokens)
    texts: dict[int, str] = {}
    with bar:
        task = bar.add_task("eval", total=len(requests))
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            for k, r in zip(idx, backend.generate_sync([requests[k] for k in idx]), strict=True):
                texts[k] = r.text
            bar.update(task, advance=len(idx))
    answers = [texts[i] for i in range(len(requests))]
    return score(studies, requests, meta, answers, started)


def _described(backend: Any, requests: Sequence[Any], batch_size: int) -> list[Any]:
    """The requests with their images' descriptions in context, each image described once by
    the model from the image alone (describe-then-answer, as the stage graph reads)."""
    from cxrtrek.graph.nodes import DESCRIPTION_TOKENS, with_descriptions
    from cxrtrek.prompts import DESCRIBE_QUESTION
    from cxrtrek.protocol import VLMRequest

    refs = {ref.digest(): ref for r in requests for ref in r.images}
    asks = [VLMRequest(request_id=f"describe/{sha}", stage=2, question=DESCRIBE_QUESTION,
                       images=[ref], max_new_tokens=DESCRIPTION_TOKENS)
            for sha, ref in refs.items()]
    texts: dict[str, str] = {}
    for i in range(0, len(asks), batch_size):
        for sha, r in zip(list(refs)[i:i + batch_size],
                          backend.generate_sync(asks[i:i + batch_size]), strict=True):
            texts[sha] = r.text
    return [with_descriptions(r, texts) for r in requests]


def build_requests(studies: Sequence[Study], truths: dict[str, dict[str, Any]], *,
                   max_closed: int | None = None) -> tuple[list[Any], list[dict[str, Any]]]:
    """The evaluation's requests (closed questions, detections, reports) and what scores each;
    ``max_closed``: at most this many closed questions per study (a sample seeded by the
    study id)."""
    from cxrtrek.protocol import VLMRequest

    requests: list[VLMRequest] = []
    meta: list[dict[str, Any]] = []
    for s in studies:
        truth = truths[f"{s.patient_id}/{s.study_id}"]
        images = list(s.images) + (list(s.prior.images) if s.prior else [])
        closed = [q for q in s.questions if q.qtype == "yes_no" or "choice" in q.qtype]
        if max_closed is not None and len(closed) > max_closed:
            keep = set(random.Random(s.study_id).sample(range(len(closed)), max_closed))
            closed = [q for i, q in enumerate(closed) if i in keep]
        for q in closed:
            ref = parse_answer(s.references[q.id].text, qtype=q.qtype,
                               task_type=q.task_type, options=q.options)
            n_img = 2 if (q.stage >= 5 and s.prior is not None) else 1
            requests.append(VLMRequest(request_id=f"{s.study_id}/{q.id}", stage=q.stage,
                                       question=q.text, images=images[:n_img],
                                       max_new_tokens=32, qtype=q.qtype, options=q.options))
            meta.append({"kind": "closed", "q": q, "ref": _closed_key(ref),
                         "group": _group(q)})
        for target, boxes in _det_targets(truth):
            requests.append(VLMRequest(request_id=f"{s.study_id}/det/{target}", stage=3,
                                       question=_DET_TEMPLATE.format(x=target),
                                       images=images[:1], max_new_tokens=72))
            meta.append({"kind": "det", "target": target, "boxes": boxes})
        requests.append(VLMRequest(request_id=f"{s.study_id}/report", stage=8,
                                   question=_REPORT_QUESTION,
                                   images=images[:2 if s.prior is not None else 1],
                                   max_new_tokens=320))
        meta.append({"kind": "report", "true": _true_report(truth)})

    return requests, meta


def _true_report(truth: dict[str, Any]) -> str:
    """The findings section a study's report should have, written from its truth: what its
    findings-report question answers (the "Findings:" part of a full report). Every study
    has one, also one whose questions ask only for the impression."""
    from cxrtrek.data.phantoms import PhantomTruth, report_findings

    return report_findings(PhantomTruth.model_validate(truth))


def score(studies: Sequence[Study], requests: Sequence[Any], meta: Sequence[dict[str, Any]],
           answers: Sequence[str], started: float) -> PhantomEval:
    """Score the answers to :func:`build_requests`' requests."""
    result = PhantomEval(studies=len(studies))
    unparsed: Counter[str] = Counter()
    # closed-ended: majority answer per group (by option text for choices)
    by_group: dict[str, Counter[str]] = defaultdict(Counter)
    for m in meta:
        if m["kind"] == "closed" and m["ref"] is not None:
            by_group[_base_key(m)].update(_ref_text(m).split("|"))
    closed: dict[str, _Tally] = defaultdict(_Tally)
    det: dict[str, _Tally] = defaultdict(_Tally)
    mean_box: dict[str, list[float]] = {}
    det_boxes: dict[str, list[list[float]]] = defaultdict(list)
    for m in meta:
        if m["kind"] == "det":
            det_boxes[m["target"]].append(m["boxes"][0])
    for target, boxes in det_boxes.items():
        mean_box[target] = [sum(b[i] for b in boxes) / len(boxes) for i in range(4)]
    reports: list[tuple[tuple[set[str], set[str]], tuple[set[str], set[str]]]] = []
    perceived: list[tuple[set[str], set[str]]] = []
    for req, m, text in zip(requests, meta, answers, strict=True):
        if m["kind"] == "closed":
            if m["ref"] is None:
                continue
            q: Question = m["q"]
            parsed = parse_answer(text, qtype=q.qtype, task_type=q.task_type, options=q.options)
            key = _closed_key(parsed)
            if key is None:
                unparsed["closed"] += 1
            base_ok = _baseline_answer(m, by_group[_base_key(m)]) == _ref_text(m)
            for name in (f"{_qkind(q)}: {m['group']}", f"all {_qkind(q)}", "all closed"):
                closed[name].add(key == m["ref"], base_ok)
        elif m["kind"] == "det":
            parsed = parse_answer(text, qtype="detection")
            thr = 0.75 if m["target"] in LARGE_STRUCTURES else 0.5
            pred = [[b.x1, b.y1, b.x2, b.y2] for b in parsed.boxes] \
                if isinstance(parsed, BoxesParse) else []
            if not isinstance(parsed, BoxesParse):
                unparsed["detection"] += 1
            ok = all(any(box_iou(p, t) >= thr for p in pred) for t in m["boxes"])
            base = all(box_iou(mean_box[m["target"]], t) >= thr for t in m["boxes"])
            group = "large structures (IoU>=0.75)" if thr == 0.75 else "focal (IoU>=0.5)"
            for name in (f"{m['target']} @{thr}", group):
                det[name].add(ok, base)
        else:
            reports.append((report_mentions(text), report_mentions(m["true"])))
            restated = _restated(req)
            if restated is not None:
                perceived.append((report_mentions(restated)[0], reports[-1][1][0]))
            if len(result.examples) < 3:
                result.examples.append({"question": req.question, "answer": text,
                                        "reference": m["true"]})
    result.closed = {k: v.row() for k, v in sorted(closed.items())}
    result.detection = {k: v.row() for k, v in sorted(det.items())}
    truths_kind = [t[0] for _, t in reports]
    truths_det = [t[1] for _, t in reports]
    _, base_kind = _best_constant(truths_kind)
    _, base_det = _best_constant(truths_det)
    result.report = {
        "f1_type": _f1((p[0], t[0]) for p, t in reports),
        "f1_type_baseline": base_kind,
        "f1_side_zone": _f1((p[1], t[1]) for p, t in reports),
        "f1_side_zone_baseline": base_det,
    }
    if perceived and len(perceived) == len(reports):
        result.report["f1_type_description"] = _f1(perceived)
    for kind in sorted({k for _, t in reports for k in t[0]}):
        result.report[f"f1:{kind}"] = _f1(({kind} & p[0], {kind} & t[0]) for p, t in reports)
    result.unparsed = dict(unparsed)
    result.wall_s = round(time.monotonic() - started, 1)
    return result


def _restated(request: Any) -> str | None:
    """The findings the current image's description (the model's own, in the request's
    context) says are present, one sentence each: what a report that only restated the
    model's perception would say; None without a description."""
    from cxrtrek.prompts.closed import current_and_prior
    from cxrtrek.prompts.notes import context_descriptions, described_findings

    described = context_descriptions(request.context)
    if not described:
        return None
    current, _ = current_and_prior(described)
    present = [name for name, there in described_findings(current).items() if there]
    return " ".join(f"{name[:1].upper()}{name[1:]} is present." for name in present)


def _base_key(m: dict[str, Any]) -> str:
    """Questions that share a majority answer: same kind, target and task."""
    q: Question = m["q"]
    return f"{_qkind(q)}/{m['group']}/{q.task_type}"


def _baseline_answer(m: dict[str, Any], counts: Counter[str]) -> str:
    """The majority answer: yes/no by count; for a choice, the offered option most often
    correct in the group (one option, also for multiple choice)."""
    if m["q"].qtype == "yes_no":
        return counts.most_common(1)[0][0]
    offered = [_option_text(o) for o in m["q"].options]
    return max(offered, key=lambda o: counts.get(o, 0)) if offered else ""


def _qkind(q: Question) -> str:
    return "yes/no" if q.qtype == "yes_no" else "choice"


def _ref_text(m: dict[str, Any]) -> str:
    """The reference answer as option texts (labels dropped), or yes/no."""
    ref = str(m["ref"])
    if m["q"].qtype == "yes_no":
        return ref
    return "|".join(sorted(_option_text(x) for x in ref.split("|")))


def format_markdown(ev: PhantomEval) -> str:
    """Tables of an evaluation, for the model card."""
    lines = [f"Held-out studies: {ev.studies}; unparsed answers: {ev.unparsed or 'none'}.", "",
             "| closed-ended | n | model | majority baseline |", "|---|---|---|---|"]
    for k, v in ev.closed.items():
        lines.append(f"| {k} | {v['n']} | {v['model']:.2f} | {v['baseline']:.2f} |")
    lines += ["", "| detection | n | model | mean-box baseline |", "|---|---|---|---|"]
    for k, v in ev.detection.items():
        lines.append(f"| {k} | {v['n']} | {v['model']:.2f} | {v['baseline']:.2f} |")
    lines += ["", "| report (findings section) | model / baseline |", "|---|---|"]
    r = ev.report
    lines.append(f"| mention F1, type | {r['f1_type']:.2f} / {r['f1_type_baseline']:.2f} |")
    lines.append(f"| mention F1, type + side/zone | {r['f1_side_zone']:.2f} / "
                 f"{r['f1_side_zone_baseline']:.2f} |")
    if "f1_type_description" in r:
        lines.append(f"| mention F1, type, of the description restated | "
                     f"{r['f1_type_description']:.2f} |")
    for name, f1 in r.items():
        if name.startswith("f1:"):
            lines.append(f"| {name[3:]} | {f1:.2f} |")
    return "\n".join(lines) + "\n"
