"""Parsers for answers to CXRTrek questions, and for the option lists embedded in questions.

Every parser takes free text (a reference answer or a model's output) and returns one of the
parsed-answer types of :mod:`cxrtrek.schema`. None of them raises on any input: an answer
that cannot be read is an :class:`~cxrtrek.schema.Unparsed` whose ``reason`` says why.

* :func:`parse_options` -- the option list written into a choice question.
* :func:`parse_yes_no` -- ``Yes.``, ``No. There is no ...``, ``B. Yes.``, ``B`` (via options).
* :func:`parse_choice` -- which options an answer selects (by label, by text, fuzzily).
* :func:`parse_boxes` -- ``<|ref|> x <|/ref|> <|box|>(x1, y1), (x2, y2)<|/box|>`` boxes.
* :func:`parse_report` -- ``Findings:`` / ``Impression:`` sections of a report.
* :func:`parse_answer` -- dispatch on the question type (and task type for reports).

Pure Python (:mod:`re` and the standard library). Every pattern is precompiled and written so
that matching stays linear in the input length: no nested or adjacent unbounded quantifiers
that can match the same characters, bounded look-backs, tails searched in a bounded window.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Literal

from pydantic import ValidationError

from cxrtrek.schema import (
    BBox,
    BoxesParse,
    ChoiceParse,
    ParsedAnswer,
    QType,
    ReportParse,
    TextParse,
    Unparsed,
    YesNoParse,
    base_qtype,
)

__all__ = [
    "ReportSection",
    "normalize_option",
    "option_label",
    "parse_answer",
    "parse_boxes",
    "parse_choice",
    "parse_options",
    "parse_report",
    "parse_yes_no",
    "report_section",
]

ReportSection = Literal["findings", "impression", "all"]
"""What a header-less report text is: its findings, its impression, or a whole report."""

_EMPTY = "empty answer"
_OPTIONS_TAIL = 10_000
"""parse_options looks for the option list in this many final characters of a question."""

# --- labels ---------------------------------------------------------------------------------------

# An option label: "A." "A)" "A)." "(A)" and the same with one- or two-digit numbers.
_LABEL = r"(?:\((?P<pl>[A-Z]|\d{1,2})\)|(?P<l>[A-Z]|\d{1,2})(?:\)\.?|\.))"
# A label as a token of running text: not glued to a preceding word, followed by space/end.
_LABEL_TOKEN_RE = re.compile(r"(?<![^\s\[(:;,'\"*])" + _LABEL + r"(?=\s|$)")
# A label at the start of an option string.
_OPTION_LABEL_RE = re.compile(r"\s*" + _LABEL + r"(?:\s+|$)")
_SEPARATOR_CHARS = frozenset("\n\r[(:;,.?!)]'\"")
_SKIP_WORDS = frozenset({"and", "or"})
_WORD_RE = re.compile(r"[^\W_]+")


@dataclass(frozen=True, slots=True)
class _Label:
    label: str
    start: int
    end: int


def _label_of(m: re.Match[str]) -> str:
    return m.group("pl") or m.group("l") or ""


def option_label(option: str) -> tuple[str, str]:
    """Split an option into its label and text: ``"B. Yes."`` -> ``("B", "Yes.")``.

    Labels are ``A.``, ``A)``, ``A).``, ``(A)`` and the numeric forms (``1.``, ``1).``);
    an unlabelled option gives ``("", option)`` (stripped).
    """
    m = _OPTION_LABEL_RE.match(option)
    if m is None:
        return "", option.strip()
    return _label_of(m), option[m.end():].strip()


def _after_separator(text: str, start: int) -> bool:
    """Whether position ``start`` follows a list separator (or the start of the text)."""
    lo = max(0, start - 40)
    window = text[lo:start].rstrip(" \t*_")
    if not window:
        return lo == 0
    if window[-1] in _SEPARATOR_CHARS:
        return True
    return window.split()[-1].lower() in _SKIP_WORDS


def _label_tokens(text: str, *, separated: bool, limit: int | None = None) -> list[_Label]:
    """The label tokens of ``text`` (only those after a separator if ``separated``), at most
    ``limit`` of them: lists of options are short, a limit only bounds adversarial input."""
    out = []
    for m in _LABEL_TOKEN_RE.finditer(text):
        if separated and not _after_separator(text, m.start()):
            continue
        out.append(_Label(_label_of(m), m.start(), m.end()))
        if limit is not None and len(out) >= limit:
            break
    return out


def _next_label(label: str) -> str:
    if label.isdigit():
        return str(int(label) + 1)
    return chr(ord(label) + 1) if label < "Z" else ""


def _strip_trailing_seps(s: str) -> str:
    """Drop trailing whitespace, ``;`` ``,`` and a trailing ``or``/``and`` word (repeatedly)."""
    while True:
        t = s.rstrip(" \t\r\n;,")
        for word in ("or", "and"):
            n = len(word)
            if t[-n:].lower() == word and (len(t) == n or not t[-n - 1].isalnum()):
                t = t[:-n]
                break
        if t == s:
            return t
        s = t


def _collapse(s: str) -> str:
    return " ".join(s.split())


def normalize_option(option: str) -> str:
    """The comparison form of an option: whitespace collapsed, one trailing period dropped.

    ``parse_options`` reproduces the question's option text, but CXRTrek's ``option_list``
    sometimes carries a period that the question does not (``A. The kidneys;`` vs
    ``"A. The kidneys."``); compare through this function.
    """
    s = _collapse(option)
    return s[:-1].rstrip() if s.endswith(".") else s


# --- question preprocessing -----------------------------------------------------------------------

# The tail after a quoted question: "' with just the answer, nothing else." / "', write only...".
_QUOTE_TAIL_RE = re.compile(r"['\"](?:\s*,\s*|\s+)[a-z][^'\"\[\]\n]{0,150}$")
# Sentence ends; a period right after a lone label ("A.", "1.", "1).") is not one.
_SENTENCE_END_RE = re.compile(
    r"(?<![\s\[(][A-Z])(?<![\s\[(]\d)(?<![\s\[(]\d\d)(?<![\s\[(]\d\))[.?!]['\"]?(?=\s)"
)
_INSTRUCTION_START_RE = re.compile(
    r"(?:Answer|Respond|Reply|Without|Please|Only|Just|Output|Give|Provide|Return|Write|"
    r"Explain|Justify|Do not|Don't|No explanation|Keep|Be|Think|What leads|Why|Briefly|"
    r"I'm|I am|Use|Format|Note|State)\b"
)
_INSTRUCTION_KEYWORD_RE = re.compile(
    r"(?i)\b(?:answers?|respon\w*|repl\w*|output|explain\w*|explanation|elaborat\w*|"
    r"text|letters?|words?|reason\w*|conclusion|format|brief\w*|concise\w*|directly)\b"
)
_INTRO_SENTENCE_RE = re.compile(
    r"(?i)\s*(?:choose|select|pick|tick|mark|identify|check|more|multiple|only one|"
    r"applicable|the correct|which|one or)\b[^.?!:]{0,200}?"
    r"\b(?:answers?|options?|choices?|statements?|responses?|appl(?:y|ies)|valid|correct|"
    r"true)\b[^.?!:]{0,200}[.?!:]"
)
_LEADING_PAREN_RE = re.compile(r"\s*\([^()]{0,200}\)")
_PERIOD_OR_RE = re.compile(r"(?<=\.)\s+or\s+")
_BARE_OR_RE = re.compile(r"(?<!\s)\s+or\s+")


def _sentence_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) of each sentence; computed once, linear in the text."""
    padded = " " + text
    spans = []
    start = 0
    for m in _SENTENCE_END_RE.finditer(padded):
        end = m.end() - 1
        spans.append((start, end))
        start = end
    if start < len(text):
        spans.append((start, len(text)))
    return spans


def _is_instruction(sentence: str) -> bool:
    s = sentence.strip().lstrip("'\"")
    if "<image>" in s:
        return True
    if s.endswith("?"):  # "What leads to this conclusion?": options are not questions
        return _LABEL_TOKEN_RE.search(s) is None
    return (
        _INSTRUCTION_START_RE.match(s) is not None
        and _INSTRUCTION_KEYWORD_RE.search(s) is not None
        and _LABEL_TOKEN_RE.search(s) is None  # "Only one answer is valid: A. x; B. y."
    )


def _strip_instructions(text: str) -> str:
    """Remove trailing instruction sentences (``Answer the question directly...``), image
    placeholders and questions without option labels (``What leads to this conclusion?``)."""
    spans = _sentence_spans(text)
    end = len(text)
    while spans:
        start, stop = spans.pop()
        if not text[start:stop].strip():
            end = start
            continue
        if not _is_instruction(text[start:stop]):
            break
        end = start
    return text[:end]


def _preprocess_question(question: str) -> str:
    t = question.strip()
    tail_at = max(0, len(t) - 300)
    m = _QUOTE_TAIL_RE.search(t, tail_at)
    if m is not None and not _LABEL_TOKEN_RE.search(m.group()):
        t = t[: m.start() + 1]  # keep the closing quote for now
    t = _strip_instructions(t).rstrip()
    if t.endswith(("'", '"')) and t[:-1].rstrip()[-1:] in (".", "]", "?", "!", ")"):
        t = t[:-1].rstrip()
    return t


# --- parse_options --------------------------------------------------------------------------------


def _fix_last_period(opts: list[str]) -> list[str]:
    """The last option's final period also ends the sentence: keep it only when another
    option ends with a period too."""
    if len(opts) >= 2 and opts[-1].endswith(".") and not any(o.endswith(".") for o in opts[:-1]):
        opts[-1] = opts[-1][:-1].rstrip()
    return opts


def _labelled_options(region: str) -> list[str]:
    # Labels after a separator ("; B.", "or B.", "\nB.") are trusted first: they skip "C." in
    # "Hepatitis C. infection". Lists separated by spaces only ("1). Left 2). Right") need all
    # label tokens; that reading wins only when it finds more options.
    strict = _labelled_options_from(region, _label_tokens(region, separated=True))
    loose = _labelled_options_from(region, _label_tokens(region, separated=False))
    return loose if len(loose) > len(strict) else strict


def _labelled_options_from(region: str, cands: list[_Label]) -> list[str]:
    # The latest "A"/"1" that has a "B"/"2" after it starts the list.
    seen_second = {"alpha": False, "digit": False}
    start_i = -1
    for i in range(len(cands) - 1, -1, -1):
        lab = cands[i].label
        family = "digit" if lab.isdigit() else "alpha"
        if lab in ("A", "1") and seen_second[family]:
            start_i = i
            break
        if lab in ("B", "2"):
            seen_second[family] = True
    if start_i < 0:
        return []
    seq = [cands[start_i]]
    expected = _next_label(seq[0].label)
    for c in cands[start_i + 1:]:
        if c.label == expected:
            seq.append(c)
            expected = _next_label(expected)
    texts: list[str] = []
    newline_separated = True
    for a, b in pairwise(seq):
        raw = region[a.end:b.start]
        body = _strip_trailing_seps(raw)
        newline_separated &= "\n" in raw[len(body):]
        texts.append(body)
    last = region[seq[-1].end:]
    if newline_separated:
        last = last.split("\n", 1)[0]
    first = seq[0].start
    opened = region.rfind("[", 0, first)
    if opened >= 0 and region.find("]", opened, first) < 0 and "]" in last:
        last = last[: last.index("]")]
    last = _strip_trailing_seps(last)
    if last.endswith(("'", '"')) and ("'" in region[:first] or '"' in region[:first]):
        last = _strip_trailing_seps(last[:-1])
    texts.append(last)
    if not all(_WORD_RE.search(t) for t in texts):
        return []  # "A. B. C." is not a list of options
    labels = [region[c.start:c.end] for c in seq]
    opts = [f"{lab} {_collapse(txt)}".rstrip() for lab, txt in zip(labels, texts, strict=True)]
    return _fix_last_period(opts)


def _split_unlabelled(region: str) -> list[str]:
    region = region.strip()
    if "\n" in region:
        pieces = region.split("\n")
    elif ";" in region:
        pieces = region.split(";")
    elif _PERIOD_OR_RE.search(region):
        pieces = [region]
    elif "," in region:
        pieces = region.split(",")
    else:
        pieces = _BARE_OR_RE.split(region)
    out: list[str] = []
    for piece in pieces:
        for part in _PERIOD_OR_RE.split(piece):
            s = _collapse(_strip_trailing_seps(part))
            if _WORD_RE.search(s):
                out.append(s)
    return _fix_last_period(out) if len(out) >= 2 else []


def _intro_region(text: str) -> str | None:
    cut = max(text.rfind(":"), text.rfind("?"))
    if cut < 0:
        return None
    region = text[cut + 1:].rstrip()
    pos = 0
    m = _LEADING_PAREN_RE.match(region)
    if m is not None:
        pos = m.end()
    # Drop intro sentences ("Choose the best answer to complete the statement.") before it.
    while (m := _INTRO_SENTENCE_RE.match(region, pos)) is not None and m.end() < len(region):
        pos = m.end()
    return region[pos:]


def parse_options(question_text: str) -> list[str]:
    """The option list written into a choice question, in order; ``[]`` when there is none.

    Handles the option styles of the CXRTrek questions: labelled options (``A.``, ``1.``,
    ``1).``, ``(A)``) separated by ``;``, ``,``, `` or ``, spaces or newlines, inline or as
    ``[ ... ]``; unlabelled ones (``No. or Yes.``, ``[ Yes. or No. ]``, ``a; b; c. or d``,
    ``a, b, c`` after a ``:``/``?`` or an intro sentence such as ``Choose the best answer to
    complete the statement.``). A quoted question's tail (``' with just the answer, nothing
    else.``) and trailing instructions (``Answer the question directly...``, image
    placeholders) are removed first. When a question holds two lists (a multi-line one and a
    bracketed restatement), the later one wins.

    Options keep their label and text as written (``"A. Yes."``), whitespace collapsed,
    separators removed. The final period of the last option is kept only when another option
    ends with a period (otherwise it ends the sentence). Compare with :func:`normalize_option`.
    The list is looked for in the last 10 000 characters of the question (after trailing
    instructions are removed).
    """
    if not isinstance(question_text, str) or not question_text.strip():
        return []
    t = _preprocess_question(question_text)[-_OPTIONS_TAIL:]
    bracket: str | None = None
    tb = t.rstrip(" .\t\r\n")
    if tb.endswith("]"):
        opened = tb.rfind("[")
        if opened >= 0:
            bracket = tb[opened + 1:-1]
    if bracket is not None:
        opts = _labelled_options(bracket) or _split_unlabelled(bracket)
        if opts:
            return opts
    opts = _labelled_options(t)
    if opts:
        return opts
    region = _intro_region(t)
    return _split_unlabelled(region) if region is not None else []


# --- tokens and text matching ---------------------------------------------------------------------

def _tokens(s: str) -> list[str]:
    return _WORD_RE.findall(s.lower())


def _tokens_with_breaks(s: str) -> tuple[list[str], list[bool]]:
    """Lower-case words, and for each whether a list could end after it: punctuation or the
    end of the text follows, or the next word is ``and``/``or``."""
    toks: list[str] = []
    breaks: list[bool] = []
    prev_end = 0
    for m in _WORD_RE.finditer(s):
        if toks:
            breaks[-1] = bool(s[prev_end:m.start()].strip())
        word = m.group().lower()
        if toks and word in _SKIP_WORDS:
            breaks[-1] = True
        toks.append(word)
        breaks.append(True)
        prev_end = m.end()
    return toks, breaks


def _similarity(a: Sequence[str], b: Sequence[str]) -> float:
    sa, sb = set(a), set(b)
    if not sa or not sb:
        return 0.0
    return len(sa & sb) / max(len(sa), len(sb))


def _segment_match(seg: str, body: list[str]) -> tuple[bool, bool]:
    """Whether ``seg`` (text after a label) names the option ``body``, and whether it is that
    option and nothing more (so that a further label continues a list)."""
    s = _tokens(seg)
    while s and s[-1] in _SKIP_WORDS:
        s.pop()
    if not s:
        return True, True
    if not body:
        return False, False
    if s[: len(body)] == body:
        return True, len(s) == len(body)
    if _similarity(s[: len(body) + 3], body) >= 0.6:
        return True, len(s) <= len(body) + 3
    return False, False


# "Answer: B", "The correct answer is B", "Option B", "Answer: Yes".
_LEAD_RE = re.compile(
    r"\s*(?:(?i:the)\s+)?(?:(?i:correct|final|best)\s+)?(?i:answer|option|choice)s?"
    r"(?:\s+(?i:is|are))?\s*(?:[:\-]\s*)?"
    r"(?=\(?(?:[A-Z]|\d{1,2})(?:[).:,;\s]|$)|(?i:yes|no|true|false)\b)"
)
_MARKDOWN_RE = re.compile(r"[*`]+")
# A whole answer made of labels: "B", "b", "(B)", "A, C and D", "1; 3".
_BARE_LABELS_RE = re.compile(
    r"\s*\(?(?:[A-Za-z]|\d{1,2})\)?\.?"
    r"(?:\s*(?:,|;|/|&|\band\b|\bor\b)\s*\(?(?:[A-Za-z]|\d{1,2})\)?\.?)*"
    r"\s*(?:[.!]\s*)?"
)
_BARE_LABEL_ITEM_RE = re.compile(r"\b(?:[A-Za-z]|\d{1,2})\b")


def _clean_answer(text: str) -> str:
    t = _MARKDOWN_RE.sub("", text).strip()
    m = _LEAD_RE.match(t)
    return t[m.end():] if m is not None else t


def _span_contains(outer: tuple[int, int], inner: tuple[int, int]) -> bool:
    return outer != inner and outer[0] <= inner[0] and inner[1] <= outer[1]


def _fits(
    toks: list[str], breaks: list[bool], pos: int, body: list[str], body_breaks: list[bool]
) -> bool:
    """Whether ``body`` matches the answer's words at ``pos`` without running over a break
    (punctuation, ``and``/``or``) that the option itself does not have there."""
    n = len(body)
    if toks[pos:pos + n] != body:
        return False
    return all(body_breaks[j] or not breaks[pos + j] for j in range(n - 1))


def _match_by_text(
    answer: str, bodies: list[list[str]], body_breaks: list[list[bool]]
) -> list[int] | str:
    """Indices of the options an answer names by their text, or a reason for failure."""
    toks, breaks = _tokens_with_breaks(_LABEL_TOKEN_RE.sub(" ", answer))
    if not toks:
        return "answer has no words to match against the options"
    order = sorted((i for i, b in enumerate(bodies) if b), key=lambda i: -len(bodies[i]))
    # 1. A leading list of options: "Nodular opacities. and Nodular opacification." Options
    # do not run over the answer's punctuation, and the longest one that ends where
    # punctuation (or "and"/"or") does is preferred: "Left., Left left." reads as "Left" +
    # "Left left", not "Left left left".
    chosen: list[int] = []
    pos = 0
    # More items than options only repeats options: stop there (bounds "yes yes yes ...").
    while pos < len(toks) and len(chosen) <= len(bodies):
        fits = [i for i in order if _fits(toks, breaks, pos, bodies[i], body_breaks[i])]
        if not fits:
            break
        at_break = [i for i in fits if breaks[pos + len(bodies[i]) - 1]]
        best = (at_break or fits)[0]
        chosen.append(best)
        pos += len(bodies[best])
        while pos < len(toks) and toks[pos] in _SKIP_WORDS:
            pos += 1
    if chosen:
        return chosen
    # 2. Options named anywhere, minus those only named inside a longer named option.
    joined = " " + " ".join(toks) + " "
    spans: dict[int, tuple[int, int]] = {}
    for i in order:
        needle = " " + " ".join(bodies[i]) + " "
        at = joined.find(needle)
        if at >= 0:
            spans[i] = (at, at + len(needle))
    found = [i for i, sp in spans.items()
             if not any(_span_contains(other, sp) for other in spans.values())]
    if found:
        return found  # several for a single-choice answer: the caller reports it
    # 3. Fuzzy: one option clearly closest (a reworded option).
    scored = sorted(((_similarity(toks, b), i) for i, b in enumerate(bodies) if b), reverse=True)
    if scored and scored[0][0] >= 0.6 and (len(scored) == 1 or scored[1][0] < scored[0][0] - 0.15):
        return [scored[0][1]]
    return "answer matches none of the options"


def _match_by_label(
    clean: str, labels: list[str], bodies: list[list[str]]
) -> list[int] | str | None:
    """Indices selected by labels, a reason for failure, or None when labels say nothing."""
    index: dict[str, int] = {}
    for i, lab in enumerate(labels):
        if lab:
            index.setdefault(lab, i)
    if not index:
        return None
    known = ", ".join(index)
    if _BARE_LABELS_RE.fullmatch(clean):
        found = [lab.upper() for lab in _BARE_LABEL_ITEM_RE.findall(clean)]
        missing = [lab for lab in found if lab not in index]
        if missing:
            return f"label(s) {', '.join(missing)} not among the option labels ({known})"
        return [index[lab] for lab in found]
    cands = [c for c in _label_tokens(clean, separated=True, limit=256) if c.label in index]
    if cands and cands[0].start == 0:
        chain = [cands[0]]
        segs = [clean[c.end:(cands[k + 1].start if k + 1 < len(cands) else len(clean))]
                for k, c in enumerate(cands)]
        for k in range(1, len(cands)):
            _, only_option = _segment_match(segs[k - 1], bodies[index[cands[k - 1].label]])
            named, _ = _segment_match(segs[k], bodies[index[cands[k].label]])
            if not (only_option and named):
                break
            chain.append(cands[k])
        return [index[c.label] for c in chain]
    first = _OPTION_LABEL_RE.match(clean)
    if first is not None and _label_of(first) not in index:
        return f"answer's label {_label_of(first)} is not among the option labels ({known})"
    # Labels later in the text count only when followed by their option's text.
    picked = []
    cands = [c for c in _label_tokens(clean, separated=False, limit=256) if c.label in index]
    for k, c in enumerate(cands):
        seg = clean[c.end:(cands[k + 1].start if k + 1 < len(cands) else len(clean))]
        body = bodies[index[c.label]]
        if _tokens(seg) and _segment_match(seg, body)[0]:
            picked.append(index[c.label])
    return picked or None


def parse_choice(text: str, options: Sequence[str], *, multi: bool) -> ChoiceParse | Unparsed:
    """Which of ``options`` an answer selects.

    Labels are read first: ``B.``, ``1).``, ``(B)``, a bare ``B``, lists such as ``A. x, D. y``,
    ``A. x; D. y``, ``B. x. and D. y``, ``A, C and D``, ``Answer: B``. A label at the start of
    the answer is authoritative (its text may differ from the option's, e.g. ``considered``
    for ``described``); further labels continue the list only while the text before them is
    just the previous option. Otherwise the options' texts are matched (labels ignored): a
    leading list of options, then options named anywhere (an option named only inside a
    longer named one does not count), then the one clearly closest option by word overlap.

    ``selected`` holds the exact strings of ``options`` and ``labels`` their labels (``"A"``,
    ``"1"``, ``""`` when unlabelled), in the options' order, without repeats. A single-choice
    answer (``multi=False``) that selects more than one option is Unparsed.
    """
    if not isinstance(text, str) or not text.strip():
        return Unparsed(reason=_EMPTY)
    opts = [o for o in options if isinstance(o, str)]
    if not opts:
        return Unparsed(reason="no options to choose from; pass parse_options(question)")
    split = [option_label(o) for o in opts]
    labels = [lab for lab, _ in split]
    tokenised = [_tokens_with_breaks(body) for _, body in split]
    bodies = [toks for toks, _ in tokenised]
    body_breaks = [brk for _, brk in tokenised]
    clean = _clean_answer(text)
    result = _match_by_label(clean, labels, bodies)
    if result is None:
        result = _match_by_text(clean, bodies, body_breaks)
    elif isinstance(result, str):
        by_text = _match_by_text(clean, bodies, body_breaks)
        if isinstance(by_text, list) and by_text:
            result = by_text
    if isinstance(result, str):
        return Unparsed(reason=result)
    chosen = sorted(set(result))
    if not chosen:
        return Unparsed(reason="answer matches none of the options")
    if not multi and len(chosen) > 1:
        named = ", ".join(repr(opts[i]) for i in chosen)
        return Unparsed(reason=f"single-choice answer selects {len(chosen)} options: {named}")
    return ChoiceParse(labels=[labels[i] for i in chosen], selected=[opts[i] for i in chosen])


# --- yes/no ---------------------------------------------------------------------------------------

_YES_NO_RE = re.compile(r"\s*(?:[\"'(\[]\s*)?(?i:(yes|no|true|false))\b")


def _yes_no_word(s: str) -> bool | None:
    m = _YES_NO_RE.match(s)
    if m is None:
        return None
    return m.group(1).lower() in ("yes", "true")


def parse_yes_no(text: str, options: Sequence[str] = ()) -> YesNoParse | Unparsed:
    """A yes/no answer: ``Yes.``, ``No. There is no ...``, ``Yes, ...``, ``Answer: no``.

    An option form (``B. Yes.``, ``1. Yes.``) is resolved through ``options`` when they are
    given, so that ``B.`` or ``B`` alone maps to the option's Yes/No; a label whose option
    says the opposite of the answer's own word is Unparsed. Without options the label is
    skipped and the word after it read.
    """
    if not isinstance(text, str) or not text.strip():
        return Unparsed(reason=_EMPTY)
    clean = _clean_answer(text)
    opts = [o for o in options if isinstance(o, str)]
    m = _OPTION_LABEL_RE.match(clean)
    if m is not None:
        label = _label_of(m)
        word = _yes_no_word(clean[m.end():])
        body = next((b for lab, b in map(option_label, opts) if lab == label), None)
        if body is None:
            if word is not None:
                return YesNoParse(value=word)
            if opts:
                return Unparsed(reason=f"label {label} is not among the options")
            return Unparsed(reason=f"label {label} without options to resolve it")
        meaning = _yes_no_word(body)
        if meaning is None:
            return Unparsed(reason=f"option {label} ({body!r}) is not a yes/no option")
        if word is not None and word != meaning:
            return Unparsed(reason=f"label {label} means {body!r} but the answer says the opposite")
        return YesNoParse(value=meaning)
    word = _yes_no_word(clean)
    if word is not None:
        return YesNoParse(value=word)
    if opts:
        choice = parse_choice(text, opts, multi=False)
        if isinstance(choice, ChoiceParse):
            meaning = _yes_no_word(option_label(choice.selected[0])[1])
            if meaning is not None:
                return YesNoParse(value=meaning)
            return Unparsed(reason=f"chosen option {choice.selected[0]!r} is not yes/no")
        return Unparsed(reason=f"no yes/no word and no option found: {choice.reason}")
    return Unparsed(reason="answer does not start with yes or no")


# --- boxes ----------------------------------------------------------------------------------------

_TAG_RE = re.compile(r"<\|(/?)(ref|box)\|>")
_NUM = r"([-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?)"
_PAIRS_RE = re.compile(
    r"\s*\(\s*" + _NUM + r"\s*,\s*" + _NUM + r"\s*\)\s*(?:,\s*)?\(\s*" + _NUM + r"\s*,\s*"
    + _NUM + r"\s*\)"
)
_FLAT_RE = re.compile(
    r"\s*[\[(]\s*" + _NUM + r"\s*,\s*" + _NUM + r"\s*,\s*" + _NUM + r"\s*,\s*" + _NUM
    + r"\s*[\])]"
)


def _box_from(content: str, closed: bool, label: str | None) -> BBox | str:
    m = _PAIRS_RE.match(content) or _FLAT_RE.match(content)
    if m is None or (closed and content[m.end():].strip()):
        snippet = content.strip()[:60]
        return f"malformed box {snippet!r}; expected (x1, y1), (x2, y2)"
    values = [float(v) for v in m.groups()]
    bad = [v for v in values if not 0.0 <= v <= 100.0]
    if bad:
        return f"box coordinate {bad[0]!r} out of range 0-100 (percent of the image)"
    x1, y1, x2, y2 = values
    if x2 < x1 or y2 < y1:
        return f"box corners not ordered: ({x1}, {y1}), ({x2}, {y2})"
    try:
        return BBox(x1=x1, y1=y1, x2=x2, y2=y2, label=label)
    except ValidationError as exc:  # pragma: no cover - guarded by the checks above
        return f"invalid box: {exc.errors()[0]['msg']}"


def parse_boxes(text: str) -> BoxesParse | Unparsed:
    """Boxes written as ``<|ref|> target <|/ref|> <|box|>(x1, y1), (x2, y2)<|/box|>``.

    Several boxes per answer; a ``<|ref|>`` labels every box after it up to the next ref (a
    box before any ref has no label); integers or floats; ``[x1, y1, x2, y2]`` inside the box
    tags is accepted too. A missing ``<|/box|>`` is tolerated. Coordinates outside 0-100,
    unordered corners, malformed or missing boxes make the answer Unparsed.
    """
    if not isinstance(text, str) or not text.strip():
        return Unparsed(reason=_EMPTY)
    tags = list(_TAG_RE.finditer(text))
    boxes: list[BBox] = []
    label: str | None = None
    for k, tag in enumerate(tags):
        if tag.group(1):
            continue
        nxt = tags[k + 1] if k + 1 < len(tags) else None
        content = text[tag.end():(nxt.start() if nxt is not None else len(text))]
        closed = nxt is not None and nxt.group(1) == "/" and nxt.group(2) == tag.group(2)
        if tag.group(2) == "ref":
            label = _collapse(content) or None
            continue
        box = _box_from(content, closed, label)
        if isinstance(box, str):
            return Unparsed(reason=box)
        boxes.append(box)
    if not boxes:
        return Unparsed(reason="no <|box|>(x1, y1), (x2, y2)<|/box|> in the answer")
    return BoxesParse(boxes=boxes)


# --- reports --------------------------------------------------------------------------------------

_HEADER_RE = re.compile(r"\b((?i:findings?|impressions?))\b[ \t]*(?:[*_]+[ \t]*)?:")
_SECTION_STRIP = " \t\r\n*#_"
_REPORT_TASK_RE = re.compile(r"Report_Generation\[(\w+)\]")


def _is_header_start(text: str, start: int) -> bool:
    """Whether a header word at ``start`` opens the text, a line or a sentence (looking back
    over at most 200 spaces/markdown characters, so that many headers stay linear)."""
    i = start - 1
    floor = max(-1, start - 201)
    while i > floor and text[i] in " \t*#_":
        i -= 1
    if i < 0:
        return True
    return text[i] in ".!?\n\r:"


def report_section(task_type: str) -> ReportSection | None:
    """The section a stage-8 task asks for: ``Report_Generation[Findings]`` -> ``findings``,
    ``[Impression]`` and ``[Impression_with(out)_findings]`` -> ``impression``, ``[ALL]`` ->
    ``all``; None for any other task type (including a bare ``Report_Generation``)."""
    m = _REPORT_TASK_RE.fullmatch(task_type.strip())
    if m is None:
        return None
    kind = m.group(1).lower()
    if kind == "findings":
        return "findings"
    if kind.startswith("impression"):
        return "impression"
    if kind == "all":
        return "all"
    return None


def parse_report(text: str, *, section: ReportSection | None = None) -> ReportParse | Unparsed:
    """The ``Findings:`` and ``Impression:`` sections of a report, in any order and case.

    A header counts at the start of the text, of a line or of a sentence (``FINDINGS:``,
    ``**Impression:**``, ``impression :``); a repeated section is joined with a space. Text
    before the first header goes to ``section`` when that is ``findings``/``impression`` and
    has no header of its own, and is dropped otherwise (a preamble such as ``Sure:``).

    A text with no header is the ``section`` it was asked for: ``findings`` or ``impression``
    (the whole text). For ``all`` (a full report was asked for) or None (unknown), a
    header-less text is Unparsed, since its sections cannot be told apart.
    """
    if not isinstance(text, str) or not text.strip():
        return Unparsed(reason=_EMPTY)
    text = text.strip()
    headers = [m for m in _HEADER_RE.finditer(text) if _is_header_start(text, m.start())]
    if not headers:
        body = text
        if section == "findings":
            return ReportParse(findings=body)
        if section == "impression":
            return ReportParse(impression=body)
        asked = "a full report" if section == "all" else "a report of unknown section"
        return Unparsed(reason=f"{asked} without 'Findings:'/'Impression:' headers")
    parts: dict[str, list[str]] = {"findings": [], "impression": []}
    for k, m in enumerate(headers):
        kind = "findings" if m.group(1).lower().startswith("finding") else "impression"
        stop = headers[k + 1].start() if k + 1 < len(headers) else len(text)
        body = text[m.end():stop].strip(_SECTION_STRIP)
        if body:
            parts[kind].append(body)
    preamble = text[: headers[0].start()].strip(_SECTION_STRIP)
    if preamble and section in ("findings", "impression") and not parts[section]:
        parts[section].append(preamble)
    findings = " ".join(parts["findings"]) or None
    impression = " ".join(parts["impression"]) or None
    if findings is None and impression is None:
        return Unparsed(reason="report headers present but every section is empty")
    return ReportParse(findings=findings, impression=impression)


# --- dispatch -------------------------------------------------------------------------------------


def parse_answer(
    text: str, *, qtype: str, task_type: str = "", options: Sequence[str] = ()
) -> ParsedAnswer:
    """Parse an answer by its question type (``qtype`` as in CXRTrek, e.g. ``multi-choice-4``).

    captioning -> :class:`TextParse`, except ``Report_Generation*`` tasks -> :func:`parse_report`
    with the section of :func:`report_section`; yes_no -> :func:`parse_yes_no`; single-choice and
    multi-choice(-N) -> :func:`parse_choice` (a Yes/No choice too); detection ->
    :func:`parse_boxes`. Choice questions need ``options`` (pass ``parse_options(question)``
    when the item has no option list). An empty answer or an unknown qtype is Unparsed.
    """
    if not isinstance(text, str) or not text.strip():
        return Unparsed(reason=_EMPTY)
    try:
        kind = base_qtype(qtype)
    except (ValueError, TypeError) as exc:
        return Unparsed(reason=str(exc) or f"unknown question type {qtype!r}")
    if kind is QType.CAPTIONING:
        if isinstance(task_type, str) and task_type.startswith("Report_Generation"):
            return parse_report(text, section=report_section(task_type))
        return TextParse(text=text.strip())
    if kind is QType.YES_NO:
        return parse_yes_no(text, options)
    if kind is QType.DETECTION:
        return parse_boxes(text)
    if not options:
        return Unparsed(reason=f"{qtype} question without options; pass parse_options(question)")
    return parse_choice(text, options, multi=kind is QType.MULTI_CHOICE)
