"""The viewer's routes on a real API (uvicorn on 127.0.0.1, httpx as the client), its page as
served (offline: nothing from elsewhere), and ``cxrtrek view``'s file, without a browser (the
browser tests are in ``test_viewer_browser.py``)."""

from __future__ import annotations

import io
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from cxrtrek.data.images import decode_image
from cxrtrek.interfaces.cli import main
from cxrtrek.interfaces.viewer import export_html, run_document
from cxrtrek.interfaces.viewer.document import static_text
from cxrtrek.schema import Answer, Question, StageResult, TextParse

from .viewer_support import AUTH, PNG, WAIT_S, Api


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    with Api(tmp_path_factory.mktemp("home")) as server:
        yield server


@pytest.fixture(scope="module")
def done(api: Api) -> str:
    run_id = api.start(indication="Cough")
    api.wait(run_id, "completed")
    return run_id


def _get(api: Api, path: str, **kw: Any) -> httpx.Response:
    kw.setdefault("headers", AUTH)
    return httpx.get(api.url + path, timeout=30, **kw)


def _post(api: Api, path: str, body: object) -> httpx.Response:
    return httpx.post(api.url + path, json=body, headers=AUTH, timeout=30)


def test_the_page_is_served_at_the_root_and_fetches_nothing_from_elsewhere(api: Api) -> None:
    page = httpx.get(api.url + "/", timeout=30)  # no token: the page holds no data
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "connect-src 'self'" in csp
    assert 'src="viewer/viewer.js"' in page.text and 'href="viewer/viewer.css"' in page.text
    for name, kind in (("viewer.js", "text/javascript"), ("viewer.css", "text/css")):
        asset = httpx.get(f"{api.url}/viewer/{name}", timeout=30)
        assert asset.status_code == 200 and asset.headers["content-type"].startswith(kind)
    missing = httpx.get(f"{api.url}/viewer/secrets.txt", timeout=30)
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "NotFound"
    for name in ("index.html", "viewer.js", "viewer.css"):  # no fonts, scripts or CDNs
        text = static_text(name)
        assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", text, re.I), name
        assert "@import" not in text and "@font-face" not in text


def test_the_viewer_routes_need_the_token(api: Api, done: str) -> None:
    for path in ["/v1/runs", f"/v1/runs/{done}/view", f"/v1/runs/{done}/images/0",
                 f"/v1/runs/{done}/diff"]:
        response = httpx.get(api.url + path, timeout=30)
        assert response.status_code == 401, path
    forked = httpx.post(f"{api.url}/v1/runs/{done}/forks", json={"stage": 2, "edits": {}},
                        headers={"Authorization": "Bearer wrong"}, timeout=30)
    assert forked.status_code == 401


def test_runs_are_listed_and_a_run_s_document_holds_its_boxes_images_and_trace(
        api: Api, done: str) -> None:
    listed = _get(api, "/v1/runs").json()["runs"]
    mine = next(r for r in listed if r["run_id"] == done)
    assert mine["status"] == "completed" and mine["study_id"] and mine["model_id"]
    doc = _get(api, f"/v1/runs/{done}/view").json()
    assert doc["format"] == 1 and doc["status"] == "completed" and doc["indication"] == "Cough"
    assert [s["stage"] for s in doc["stages"]] == list(range(1, 9))
    assert doc["stages"][4]["skipped"] == "no prior study"
    assert all(s["elapsed_s"] is not None for s in doc["stages"] if not s["skipped"])
    report = _get(api, f"/v1/runs/{done}").json()["report"]
    answered = [(a["question_id"], [b["x1"], b["y1"], b["x2"], b["y2"]])
                for s in report["stages"] for a in s["answers"]
                if a["parsed"]["kind"] == "boxes" for b in a["parsed"]["boxes"]]
    assert [(b["question_id"], b["box"]) for b in doc["boxes"]] == answered
    assert len({b["colour"] for b in doc["boxes"]}) == 2
    assert doc["images"] == [{"index": 0, "name": "image 1 (current)", "role": "current",
                              "view": None, "sha256": doc["images"][0]["sha256"],
                              "url": f"/v1/runs/{done}/images/0"}]
    kinds = {r["kind"] for r in doc["trace"]}
    assert {"run", "question", "stage", "end"} <= kinds
    assert doc["report"]["impression"] == report["impression"]
    image = _get(api, doc["images"][0]["url"])
    assert image.status_code == 200 and image.headers["content-type"] == "image/png"
    shown = Image.open(io.BytesIO(image.content))
    pixels = decode_image(PNG).pixels
    assert shown.mode == "L" and shown.size == (pixels.shape[1], pixels.shape[0])
    assert _get(api, f"/v1/runs/{done}/images/1").status_code == 404
    assert _get(api, "/v1/runs/nope-1/view").status_code == 404


def test_a_paused_run_s_document_holds_the_review_and_no_stage_it_has_not_reached(
        api: Api) -> None:
    run_id = api.start(review_after="2")
    api.wait(run_id, "awaiting_review")
    doc = _get(api, f"/v1/runs/{run_id}/view").json()
    assert doc["status"] == "awaiting_review" and doc["review"]["stage"] == 2
    assert [s["stage"] for s in doc["stages"] if not s["skipped"]] == [1, 2]
    assert all(s["skipped"] != "not run" for s in doc["stages"])
    assert doc["report"] is None
    assert httpx.post(f"{api.url}/v1/runs/{run_id}/review", json={"edits": {}}, headers=AUTH,
                      timeout=30).status_code == 202
    api.wait(run_id, "completed")


def _wait_done(api: Api, run_id: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while _get(api, f"/v1/runs/{run_id}").json()["status"] in ("queued", "running"):
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_a_fork_reruns_the_later_stages_and_its_diff_names_what_changed(api: Api,
                                                                         done: str) -> None:
    for body, status, words in [
            ({"stage": 2, "edits": {"nope": "x"}}, 422, "asked no question 'nope'"),
            ({"stage": 2, "edits": {"s2-findings": "  "}}, 422, "is empty"),
            ({"stage": 2, "edits": {}}, 422, "edits"),
            ({"stage": 9, "edits": {"a": "b"}}, 422, "stage"),
            ({"stage": 5, "edits": {"a": "b"}}, 409, "no answers of stage 5")]:
        refused = _post(api, f"/v1/runs/{done}/forks", body)
        assert refused.status_code == status and words in refused.json()["error"]["message"], (
            body, refused.text)
    assert _post(api, "/v1/runs/nope-1/forks", {"stage": 2, "edits": {"a": "b"}}
                 ).status_code == 404
    started = _post(api, f"/v1/runs/{done}/forks",
                    {"stage": 2, "edits": {"s2-findings": "Pneumothorax."}})
    assert started.status_code == 202, started.text
    fork_id = started.json()["run_id"]
    assert fork_id.startswith(f"{done}-fork-")
    assert started.json()["forked_from"] == {"run_id": done, "stage": 2}
    _wait_done(api, fork_id)
    events = httpx.get(f"{api.url}/v1/runs/{fork_id}/events", headers=AUTH, timeout=30).text
    assert [int(n) for n in re.findall(r'"kind":"stage","stage":(\d)', events)] == [3, 4, 5, 6,
                                                                                    7, 8]
    doc = _get(api, f"/v1/runs/{fork_id}/view").json()
    assert doc["forked_from"]["run_id"] == done and doc["status"] == "completed"
    assert doc["stages"][1]["reviewed"] == ["s2-findings"]
    assert [b["finding"] for b in doc["boxes"]] == ["pneumothorax"]
    diff = _get(api, f"/v1/runs/{fork_id}/diff").json()
    assert (diff["before"], diff["after"], diff["stage"]) == (done, fork_id, 2)
    edit = diff["stages"][1]["changes"]
    assert [(c["before"], c["after"]) for c in edit] == [
        ("Cardiomegaly and left pleural effusion.", "Pneumothorax.")]
    boxes = next(c for c in diff["stages"][2]["changes"] if c["question_id"] == "s3-box-1")
    assert "cardiomegaly" in boxes["before_question"]
    assert "pneumothorax" in boxes["after_question"]
    same = _get(api, f"/v1/runs/{done}/diff", params={"against": done}).json()
    assert same["first_divergent_stage"] is None
    assert _get(api, f"/v1/runs/{done}/diff").status_code == 422  # not a fork
    listed = {r["run_id"]: r for r in _get(api, "/v1/runs").json()["runs"]}
    assert listed[fork_id]["forked_from"]["run_id"] == done


def test_cxrtrek_view_without_checkpoints_rebuilds_the_stages_from_the_trace(
        api: Api, done: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trace = Path(api.agent.settings.trace_path()) / f"{done}.jsonl"
    out = tmp_path / "out" / "case.html"
    # another home: no checkpoints there, so the trace alone tells the run
    assert main(["view", str(trace), "--out", str(out), "--home", str(tmp_path)]) == 0
    err = capsys.readouterr().err
    assert "not in the checkpoints" in err and "0 of 1 image(s) embedded" in err
    assert not (tmp_path / "checkpoints.sqlite").exists()
    html = out.read_text(encoding="utf-8")
    doc = json.loads(re.search(r'<script id="cxrtrek-run" type="application/json">(.*?)'
                               r"</script>", html, re.S).group(1))  # type: ignore[union-attr]
    live = _get(api, f"/v1/runs/{done}/view").json()
    assert [s["stage"] for s in doc["stages"]] == list(range(1, 9))
    assert [b["box"] for b in doc["boxes"]] == [b["box"] for b in live["boxes"]]
    assert doc["report"]["impression"] == live["report"]["impression"]
    assert doc["images"][0]["url"] is None and doc["images"][0]["sha256"]
    assert "http-equiv=\"Content-Security-Policy\"" in html and "viewer/viewer.js" not in html
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"kind": "stage"}\n')
    assert main(["view", str(bad)]) == 2
    assert "Traceback" not in capsys.readouterr().err


def test_the_embedded_document_cannot_end_its_script_element() -> None:
    hostile = "</script><script>alert(1)</script><!-- \u2028"
    question = Question(id="q", stage=7, task_type="Diagnosis_Advice", qtype="captioning",
                        text="Diagnosis?")
    stages = [StageResult(stage=7, name="diagnosis", questions=[question], answers=[
        Answer(question_id="q", text=hostile, parsed=TextParse(text=hostile))])]
    doc = run_document(run_id="r", status="completed", stages=stages, records=[])
    html = export_html(doc)
    scripts = re.findall(r"<script\b[^>]*>(.*?)</script>", html, re.S | re.I)
    assert len(scripts) == 2  # the document, then the viewer's code: nothing injected
    assert json.loads(scripts[0]) == doc
