"""``hf:PATH`` behind ``cxrtrek serve`` (a real subprocess on 127.0.0.1, driven by the OpenAI
SDK and by the HTTP backend) and on the command line (``run`` with --device, --dtype and
--dialect)."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from cxrtrek.backends.hf import HFBackend
from cxrtrek.backends.http import HTTPBackend
from cxrtrek.data.images import EXAMPLES_DIR
from cxrtrek.interfaces._commands import serve_spec
from cxrtrek.interfaces.cli import EXIT_OK, EXIT_USAGE, main
from cxrtrek.protocol import VLMRequest
from cxrtrek.schema import ImageRef

from .conftest import BUNDLED

REPO = Path(__file__).resolve().parents[2]
PNG = Path(EXAMPLES_DIR) / "phantom_chest_pa.png"
QUESTION = "Is there any evidence of pleural effusion?"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def qwen_server(vlm_folders: dict[str, Path], tmp_path_factory: pytest.TempPathFactory,
                ) -> Iterator[str]:
    """``cxrtrek serve --model hf:PATH`` on the tiny Qwen2-VL; its base URL."""
    port = _free_port()
    log = tmp_path_factory.mktemp("serve") / "server.log"
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1"}
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cxrtrek.interfaces.cli", "serve", "--model",
             f"hf:{vlm_folders['qwen2_vl']}", "--device", "cpu", "--dtype", "float32",
             "--port", str(port), "--threads", "1", "--max-wait-ms", "20"],
            env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, f"the server exited: {log.read_text()[-3000:]}"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).is_success:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not come up in time"
            time.sleep(0.2)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def test_serve_hf_answers_the_openai_sdk_as_the_model_in_process(
        qwen_server: str, hf_backends: dict[str, HFBackend]) -> None:
    client = openai.OpenAI(base_url=qwen_server, api_key="unused", max_retries=0, timeout=60)
    (model,) = [m.id for m in client.models.list()]
    assert model == "qwen2_vl"
    url = "data:image/png;base64," + base64.b64encode(PNG.read_bytes()).decode()
    image: Any = {"type": "image_url", "image_url": {"url": url}}
    # a plain request: an image and a question; the stage rides in the extra body until the
    # server answers requests without one
    completion = client.chat.completions.create(
        model=model, max_tokens=12, temperature=0,
        messages=[{"role": "user", "content": [image, {"type": "text", "text": QUESTION}]}],
        extra_body={"cxrtrek": {"stage": 2}})
    (expected,) = hf_backends["qwen2_vl"].generate_sync([VLMRequest(
        request_id="r", stage=2, question=QUESTION, images=[ImageRef(data=PNG.read_bytes())],
        max_new_tokens=12)])
    assert completion.choices[0].message.content == expected.text
    assert completion.choices[0].finish_reason == expected.finish_reason
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == expected.prompt_tokens
    assert completion.usage.completion_tokens == expected.completion_tokens

    async def through_our_client() -> str:
        async with HTTPBackend([qwen_server]) as backend:
            (got,) = await backend.generate([VLMRequest(
                request_id="h", stage=2, question=QUESTION,
                images=[ImageRef(data=PNG.read_bytes())], max_new_tokens=12)])
            return got.text

    assert asyncio.run(through_our_client()) == expected.text


def test_serve_takes_a_bare_transformers_folder_as_hf(vlm_folders: dict[str, Path]) -> None:
    folder = vlm_folders["gemma3"]
    assert serve_spec(str(folder)) == f"hf:{folder}"
    assert serve_spec("tiny") == "inprocess:tiny"
    assert serve_spec(f"hf:{folder}") == f"hf:{folder}"


def test_run_with_an_hf_backend_device_dtype_and_dialect(
        vlm_folders: dict[str, Path], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["run", str(BUNDLED), "--backend", f"hf:{vlm_folders['llava']}",
                 "--device", "cpu", "--dtype", "float32", "--dialect", "cxrtrek",
                 "--max-new-tokens", "4", "--home", str(tmp_path), "--json"])
    captured = capsys.readouterr()
    assert code == EXIT_OK, captured.err
    report = json.loads(captured.out)
    assert report["status"] == "completed"
    assert [s["stage"] for s in report["stages"]] == list(range(1, 9))
    trace = next((tmp_path / "traces").glob("*.jsonl")).read_text().splitlines()
    questions = [json.loads(x) for x in trace if '"kind":"question"' in x.replace(" ", "")]
    assert questions and {q["dialect"] for q in questions} == {"cxrtrek"}
    assert {q["model_id"] for q in questions} == {"llava"}


def test_run_refuses_a_bad_dialect_or_folder_in_one_line(
        vlm_folders: dict[str, Path], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["run", str(PNG), "--backend", f"hf:{vlm_folders['llava']}", "--device", "cpu",
                 "--dialect", "klingon", "--home", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == EXIT_USAGE and "unknown dialect 'klingon'" in err and "Traceback" not in err
    code = main(["run", str(PNG), "--backend", f"hf:{tmp_path}", "--home", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == EXIT_USAGE and "has no config.json" in err and "Traceback" not in err
