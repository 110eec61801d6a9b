"""The web viewer in a real headless Chromium (Debian's ``chromium``, driven over the DevTools
protocol), over a real ``cxrtrek api`` on 127.0.0.1 with a bearer token and a scripted
backend: an upload whose 8 stages arrive live, boxes where the answers put them, a review
pause approved in the page, a fork with an edit and its diff, and the self-contained file of
``cxrtrek view`` opened from a ``file://`` URL. Each test saves a screenshot in its tmp folder.

Without Chromium these tests skip, except in CI (``CI`` set), where they fail.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from cxrtrek.agent.agent import AgentSettings, CXRTrekAgent
from cxrtrek.backends.registry import load_backend
from cxrtrek.data.cxrtrek import load_studies
from cxrtrek.interfaces.cli import main

from .chromium import Browser, find_chromium
from .viewer_support import AUTH, JPG, PNG, STUDY_FILE, TOKEN, WAIT_S, Api


@pytest.fixture(scope="module")
def chromium() -> str:
    path, reason = find_chromium()
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"the browser tests must run in CI: {reason}")
        pytest.skip(reason)
    return path


@pytest.fixture(scope="module")
def browser(chromium: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Browser]:
    b = Browser(chromium, tmp_path_factory.mktemp("chromium") / "profile")
    try:
        yield b
    finally:
        b.close()


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    with Api(tmp_path_factory.mktemp("home")) as server:
        yield server


@pytest.fixture(scope="module")
def done(api: Api) -> str:
    """A completed reading (no prior: stage 5 skipped)."""
    run_id = api.start(indication="Cough")
    api.wait(run_id, "completed")
    return run_id


@pytest.fixture()
def page(browser: Browser) -> Iterator[Browser]:
    browser.errors.clear()
    yield browser
    assert not browser.errors, f"the page logged errors: {browser.errors}"


def _open_run(page: Browser, api: Api, run_id: str) -> None:
    page.open(f"{api.url}/#token={TOKEN}&run={run_id}")
    page.wait_for(f"window.cxrtrekViewer && cxrtrekViewer.state.doc && "
                  f"cxrtrekViewer.state.doc.run_id === {json.dumps(run_id)} && "
                  "cxrtrekViewer.state.lastFinal && !cxrtrekViewer.state.refreshing && "
                  "!cxrtrekViewer.state.refreshTimer", WAIT_S,
                  f"run {run_id} to open and its past events to be shown")


def _stage_cards(page: Browser) -> list[dict[str, Any]]:
    cards: list[dict[str, Any]] = page.eval(
        "Array.from(document.querySelectorAll('#stages .stage')).map(e => ({stage: "
        "+e.dataset.stage, cls: e.className, answers: e.querySelectorAll('.qa-item').length}))")
    return cards


# --- the tests ------------------------------------------------------------------------------


def test_a_reading_started_by_upload_shows_its_8_stages_as_they_arrive(
        page: Browser, api: Api, tmp_path: Path) -> None:
    page.open(f"{api.url}/#token={TOKEN}")
    page.wait_for("window.cxrtrekViewer && document.querySelector('#runs li')", WAIT_S,
                  "the page and its run list")
    assert page.eval("document.querySelector('#token').value") == TOKEN
    assert page.eval("location.hash") == ""  # the token is not left in the address
    # the current image is dropped on its zone; the prior is chosen with the file input
    data = base64.b64encode(PNG.read_bytes()).decode()
    page.eval(f"""(() => {{
        const bytes = Uint8Array.from(atob('{data}'), c => c.charCodeAt(0));
        const dt = new DataTransfer();
        dt.items.add(new File([bytes], 'frontal.png', {{type: 'image/png'}}));
        document.querySelector('#drop-images').dispatchEvent(
            new DragEvent('drop', {{dataTransfer: dt, bubbles: true, cancelable: true}}));
    }})()""")
    root = page.call("DOM.getDocument")["root"]["nodeId"]
    node = page.call("DOM.querySelector", nodeId=root, selector="#file-prior")["nodeId"]
    page.call("DOM.setFileInputFiles", files=[str(JPG)], nodeId=node)
    assert page.eval("document.querySelector('#drop-images .files').textContent").startswith(
        "frontal.png")
    page.wait_for("document.querySelector('#drop-prior .files li')", WAIT_S, "the prior")
    page.eval("document.querySelector('#indication').value = 'Shortness of breath'")
    page.eval("document.querySelector('#start').click()")
    page.wait_for("cxrtrekViewer.state.lastFinal === 'report'", WAIT_S, "the report event")
    page.wait_for("document.querySelector('#run-status').textContent === 'completed' && "
                  "document.querySelectorAll('#stages .stage.done').length === 8", WAIT_S,
                  "8 answered stages")
    page.screenshot(tmp_path / "upload.png")
    events = page.eval("cxrtrekViewer.state.events.map(e => [e.name, e.stage])")
    assert events == [["stage", n] for n in range(1, 9)] + [["report", None]]
    run_id = page.eval("cxrtrekViewer.state.runId")
    cards = _stage_cards(page)
    assert [c["stage"] for c in cards] == list(range(1, 9))
    assert all(c["answers"] >= 1 for c in cards)
    assert "Impression" in page.eval("document.querySelector('#report').textContent")
    view = httpx.get(f"{api.url}/v1/runs/{run_id}/view", headers=AUTH, timeout=30).json()
    assert [i["role"] for i in view["images"]] == ["current", "prior"]
    assert view["indication"] == "Shortness of breath"
    assert page.eval(f"!!document.querySelector('#runs li[data-run=\"{run_id}\"]')")


def test_boxes_are_drawn_where_the_answers_put_them(page: Browser, api: Api, done: str,
                                                    tmp_path: Path) -> None:
    report = httpx.get(f"{api.url}/v1/runs/{done}", headers=AUTH, timeout=30).json()["report"]
    parsed = {a["question_id"]: a["parsed"]["boxes"][0] for s in report["stages"]
              for a in s["answers"] if a["parsed"]["kind"] == "boxes"}
    assert len(parsed) == 2 and len({tuple(b.values()) for b in parsed.values()}) == 2
    _open_run(page, api, done)
    page.wait_for(f"document.querySelector('#image').dataset.loaded && "
                  f"document.querySelectorAll('#boxes .box').length === {len(parsed)}", WAIT_S,
                  "the image and its boxes")
    geometry = page.eval("""(() => {
        const c = document.querySelector('#image').getBoundingClientRect();
        return {canvas: [c.left, c.top, c.width, c.height],
                boxes: Array.from(document.querySelectorAll('#boxes .box')).map(e => {
                    const r = e.getBoundingClientRect();
                    return {q: e.dataset.question, finding: e.dataset.finding,
                            colour: getComputedStyle(e).borderTopColor,
                            rect: [r.left, r.top, r.right, r.bottom]};
                })};
    })()""")
    left, top, width, height = geometry["canvas"]
    assert width > 100 and height > 100
    for drawn in geometry["boxes"]:
        box = parsed[drawn["q"]]
        expected = [left + box["x1"] / 100 * width, top + box["y1"] / 100 * height,
                    left + box["x2"] / 100 * width, top + box["y2"] / 100 * height]
        assert drawn["rect"] == pytest.approx(expected, abs=1.5), (drawn, box)
    assert geometry["boxes"][0]["colour"] != geometry["boxes"][1]["colour"]
    # hovering an answer highlights its box (and only its box)
    qid = geometry["boxes"][0]["q"]
    page.eval(f"document.querySelector('.qa-item[data-question=\"{qid}\"]')"
              ".dispatchEvent(new MouseEvent('mouseenter'))")
    assert page.eval("Array.from(document.querySelectorAll('#boxes .box.hl'))"
                     ".map(e => e.dataset.question)") == [qid]
    page.screenshot(tmp_path / "boxes-highlighted.png")
    page.eval(f"document.querySelector('.qa-item[data-question=\"{qid}\"]')"
              ".dispatchEvent(new MouseEvent('mouseleave'))")
    # a finding's boxes toggle off and on from the legend
    finding = geometry["boxes"][0]["finding"]
    toggle = f"document.querySelector('#legend input[data-finding=\"{finding}\"]').click()"
    page.eval(toggle)
    assert page.eval("Array.from(document.querySelectorAll('#boxes .box'))"
                     ".map(e => e.dataset.finding)") == [geometry["boxes"][1]["finding"]]
    page.eval(toggle)
    assert page.eval("document.querySelectorAll('#boxes .box').length") == 2
    # window and level change the pixels shown, and reset restores them
    probe = ("(() => { const c = document.querySelector('#image'); return Array.from("
             "c.getContext('2d').getImageData(c.width / 2, c.height / 2, 1, 1).data); })()")
    before = page.eval(probe)
    page.eval("(() => { const w = document.querySelector('#wl-window'); w.value = '40'; "
              "w.dispatchEvent(new Event('input')); })()")
    assert page.eval(probe) != before
    page.screenshot(tmp_path / "window-level.png")
    page.eval("document.querySelector('#wl-reset').click()")
    assert page.eval(probe) == before


def test_a_review_pause_is_approved_in_the_page(page: Browser, api: Api,
                                                tmp_path: Path) -> None:
    run_id = api.start(review_after="2")
    api.wait(run_id, "awaiting_review")
    _open_run(page, api, run_id)
    page.wait_for("document.querySelector('#review:not([hidden]) #approve')", WAIT_S,
                  "the review panel")
    assert page.eval("document.querySelector('#review').dataset.stage") == "2"
    assert page.eval("document.querySelectorAll('#stages .stage.done').length") == 2
    page.screenshot(tmp_path / "review.png")
    page.eval("document.querySelector('#approve').click()")
    page.wait_for("document.querySelector('#run-status').textContent === 'completed' && "
                  "document.querySelectorAll('#stages .stage.done, #stages .stage.skipped')"
                  ".length === 8", WAIT_S, "the run to go on and complete")
    assert page.eval("document.querySelector('#review').hidden") is True
    page.screenshot(tmp_path / "reviewed.png")
    assert api.wait(run_id, "completed")["report"]["impression"]
    trace = httpx.get(f"{api.url}/v1/runs/{run_id}/trace", headers=AUTH, timeout=30).json()
    assert not [r for r in trace if r["kind"] == "review"]  # approved as it was
    assert [n for n, _ in page.eval("cxrtrekViewer.state.events.map(e => [e.name, 0])")
            ].count("stage") >= 6  # the stages after the pause arrived live


def test_a_fork_with_a_corrected_answer_shows_the_downstream_diff(
        page: Browser, api: Api, done: str, tmp_path: Path) -> None:
    _open_run(page, api, done)
    page.wait_for("document.querySelector('.qa-item[data-question=\"s2-findings\"] .edit-btn')",
                  WAIT_S, "the answers to be editable")
    page.eval("document.querySelector('.qa-item[data-question=\"s2-findings\"] .edit-btn')"
              ".click()")
    page.eval("(() => { const t = document.querySelector("
              "'.qa-item[data-question=\"s2-findings\"] textarea'); t.value = 'Pneumothorax.'; "
              "t.dispatchEvent(new Event('input')); })()")
    page.eval("document.querySelector('.qa-item[data-question=\"s2-findings\"] .fork-btn')"
              ".click()")
    page.wait_for("document.querySelector('#diff:not([hidden]) table.diff tbody tr')", WAIT_S,
                  "the diff of the fork")
    page.screenshot(tmp_path / "fork-diff.png")
    fork_id = page.eval("cxrtrekViewer.state.runId")
    assert fork_id.startswith(f"{done}-fork-")
    rows = page.eval("""Array.from(document.querySelectorAll('#diff tbody tr')).map(r => ({
        stage: +r.dataset.stage, cls: r.className,
        cells: Array.from(r.cells).map(c => c.textContent)}))""")
    edit = next(r for r in rows if r["stage"] == 2)
    assert "edit" in edit["cls"]
    assert edit["cells"][2:] == ["Cardiomegaly and left pleural effusion.", "Pneumothorax."]
    boxes = next(r for r in rows if r["stage"] == 3 and "bounding box" in r["cells"][1])
    assert "pneumothorax" in boxes["cells"][1]  # the fork asks about the corrected finding
    assert boxes["cells"][2].startswith("asked: Please locate the cardiomegaly")
    assert boxes["cells"][3].endswith("<|ref|> pneumothorax <|/ref|> "
                                      "<|box|>(55.0, 18.0), (85.0, 60.0)<|/box|>")
    assert {r["stage"] for r in rows if "unchanged" in r["cls"]} >= {5, 7, 8}
    assert page.eval("document.querySelector('#run-status').textContent") == "completed"
    diff = httpx.get(f"{api.url}/v1/runs/{fork_id}/diff", headers=AUTH, timeout=30).json()
    assert diff["before"] == done and diff["stage"] == 2
    assert diff["first_divergent_stage"] == 2


def test_the_file_of_cxrtrek_view_opens_from_a_file_url(page: Browser, tmp_path: Path) -> None:
    (study,) = load_studies(STUDY_FILE)
    home = tmp_path / "home"
    agent = CXRTrekAgent(load_backend("scripted-oracle", study),
                         settings=AgentSettings(home=str(home)))
    report = agent.run(study)
    assert report.status == "completed" and report.run_id is not None
    out = tmp_path / "run.html"
    trace = home / "traces" / f"{report.run_id}.jsonl"
    # as CXRTrekNet's backend would record it: stage 2's first answer chosen of 7
    marked = [json.loads(x) for x in trace.read_text(encoding="utf-8").splitlines()]
    first = next(r for r in marked if r["kind"] == "question" and r["stage"] == 2)
    first["candidates"] = 7
    trace.write_text("".join(json.dumps(r) + "\n" for r in marked), encoding="utf-8")
    assert main(["view", str(trace), "--out", str(out), "--home", str(home)]) == 0
    boxes = [b for s in report.stages for a in s.answers if a.parsed.kind == "boxes"
             for b in a.parsed.boxes]
    assert len(boxes) == 2
    page.open(out.as_uri())
    page.wait_for("document.body.classList.contains('static') && "
                  "document.querySelector('#image').dataset.loaded && "
                  "document.querySelectorAll('#boxes .box').length === 2", WAIT_S,
                  "the file's run, image and boxes")
    page.screenshot(tmp_path / "view-file.png")
    assert [c["stage"] for c in _stage_cards(page) if "done" in c["cls"]] == list(range(1, 9))
    geometry = page.eval("""(() => {
        const c = document.querySelector('#image').getBoundingClientRect();
        return {canvas: [c.left, c.top, c.width, c.height],
                boxes: Array.from(document.querySelectorAll('#boxes .box'))
                    .map(e => { const r = e.getBoundingClientRect();
                                return [r.left, r.top, r.right, r.bottom]; })};
    })()""")
    left, top, width, height = geometry["canvas"]
    for drawn, box in zip(geometry["boxes"], boxes, strict=True):
        assert drawn == pytest.approx([left + box.x1 / 100 * width, top + box.y1 / 100 * height,
                                       left + box.x2 / 100 * width,
                                       top + box.y2 / 100 * height], abs=1.5)
    made = page.eval("Array.from(document.querySelectorAll('.qa-item .made'))"
                     ".map(e => [e.closest('.qa-item').dataset.question, e.textContent])")
    assert made == [[first["question_id"],
                     "best of 7 candidates by agreement with the description"]]
    assert page.eval("document.querySelectorAll('#image-tabs button').length") == 2
    assert "Impression" in page.eval("document.querySelector('#report').textContent")
    page.eval("document.querySelector('.stage[data-stage=\"3\"] .trace-btn').click()")
    trace_text = page.eval("document.querySelector('#trace').textContent")
    assert "raw output" in trace_text and "left lung" in trace_text
    assert page.eval("getComputedStyle(document.querySelector('#side')).display") == "none"
