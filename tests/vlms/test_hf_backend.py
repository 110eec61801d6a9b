"""The transformers backend (``hf:PATH``) on tiny random-weight models of four families:
full readings through all eight stages, batched answers equal to answers alone, images as
cxrtrek decodes them, the default dialect, and clear errors for folders it cannot load."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest

from cxrtrek.agent.agent import AgentSettings, CXRTrekAgent
from cxrtrek.backends.hf import DIALECT_KEY, HFBackend, default_dialect, to_pil
from cxrtrek.backends.registry import BACKEND_SPECS, BackendOptions, demo_checkpoint, load_backend
from cxrtrek.data.images import EXAMPLES_DIR
from cxrtrek.errors import ConfigError
from cxrtrek.graph.trace import QuestionRecord, read_trace
from cxrtrek.prompts import DEFAULT_SYSTEM_PROMPT
from cxrtrek.prompts.dialects import DIALECTS
from cxrtrek.protocol import DecodingSettings, VLMRequest, VLMResponse
from cxrtrek.schema import ImageRef, Study

from .build import FAMILIES

EXAMPLES = Path(EXAMPLES_DIR)
TEMPLATE_MARK = {"qwen2_vl": "<|im_start|>assistant\n", "qwen2_5_vl": "<|im_start|>assistant\n",
                 "gemma3": "<start_of_turn>model\n", "llava": "ASSISTANT:"}
IMAGE_MARK = {"qwen2_vl": "<|vision_start|><|image_pad|><|vision_end|>",
              "qwen2_5_vl": "<|vision_start|><|image_pad|><|vision_end|>",
              "gemma3": "<start_of_image>", "llava": "<image>"}


def _with_dialect(backend: HFBackend, dialect: str) -> HFBackend:
    """The same loaded model in another dialect."""
    return HFBackend(backend.model, backend.processor, model_id=backend.model_id,
                     dialect=dialect, max_batch_size=backend.max_batch_size)


# --- full readings -------------------------------------------------------------------------


@pytest.mark.parametrize("dialect", DIALECTS)
@pytest.mark.parametrize("family", FAMILIES)
def test_a_full_reading_with_a_prior_through_all_eight_stages(
        family: str, dialect: str, hf_backends: dict[str, HFBackend], bundled_study: Study,
        tmp_path: Path) -> None:
    backend = _with_dialect(hf_backends[family], dialect)
    agent = CXRTrekAgent(backend, settings=AgentSettings(home=str(tmp_path), max_new_tokens=6))
    report = agent.run(bundled_study)
    assert report.status == "completed"
    assert [s.stage for s in report.stages] == list(range(1, 9))  # stage 5: the prior
    questions = [r for r in read_trace(tmp_path / "traces" / f"{report.run_id}.jsonl")
                 if isinstance(r, QuestionRecord)]
    assert {q.stage for q in questions} == set(range(1, 9))
    for q in questions:
        assert q.dialect == dialect and q.model_id == backend.model_id
        assert q.prompt is not None and q.prompt.endswith(TEMPLATE_MARK[family])
        assert 1 <= q.completion_tokens <= 6 and q.prompt_tokens > len(q.question) // 8
    # stage 5 compares with the prior: both studies' images are in its chat
    stage5 = next(q for q in questions if q.stage == 5)
    assert stage5.prompt is not None and stage5.prompt.count(IMAGE_MARK[family]) == 2
    assert backend.peak_rows > 1  # a stage's questions went in one batch


# --- batched answers equal answers alone -------------------------------------------------


def _requests(images: list[ImageRef], n: int = 6) -> list[VLMRequest]:
    """Questions with one or two images of different sizes, with and without context."""
    questions = ["Is there any evidence of pleural effusion?", "Which view is this image?",
                 "What abnormalities can be identified?", "Describe the heart size.",
                 "Has the opacity changed since the prior study?", "What is the diagnosis?"]
    out = []
    for i in range(n):
        imgs = images[i % 3: i % 3 + 1 + (i % 2)]
        out.append(VLMRequest(
            request_id=f"q{i}", stage=2 + i % 4, question=questions[i], images=imgs,
            system=DEFAULT_SYSTEM_PROMPT, max_new_tokens=8 + 2 * i,
            context=[(1, "From which direction was this chest X-ray taken?",
                      "PA view.")] * (i % 3)))
    return out


@pytest.fixture(scope="module")
def example_images() -> list[ImageRef]:
    """The bundled examples: DICOM, JPEG, 8-bit and 16-bit PNG (two sizes)."""
    return [ImageRef(path=str(EXAMPLES / name)) for name in
            ("phantom_chest_pa.png", "phantom_chest_pa.dcm", "phantom_chest_pa_16bit.png",
             "phantom_chest_pa.jpg")]


def _same(a: list[VLMResponse], b: list[VLMResponse]) -> None:
    for x, y in zip(a, b, strict=True):
        assert (x.request_id, x.text, x.completion_tokens, x.prompt_tokens, x.finish_reason) \
            == (y.request_id, y.text, y.completion_tokens, y.prompt_tokens, y.finish_reason)


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_answers_equal_answers_alone(family: str, hf_backends: dict[str, HFBackend],
                                             example_images: list[ImageRef]) -> None:
    backend = hf_backends[family]
    requests = _requests(example_images)
    alone = [backend.generate_sync([r])[0] for r in requests]
    assert len({r.text for r in alone}) > 1  # real, varied text
    batches_before = backend.batches
    _same(backend.generate_sync(requests), alone)
    assert backend.batches == batches_before + 1

    async def two_readings() -> list[list[VLMResponse]]:  # concurrent calls share batches
        return list(await asyncio.gather(backend.generate(requests[:3]),
                                         backend.generate(requests[3:])))

    first, second = asyncio.run(two_readings())
    _same(first + second, alone)
    for r in alone:
        assert r.dialect == backend.dialect.name and r.prompt is not None
        assert r.finish_reason in ("stop", "length")
        assert r.completion_tokens <= next(q.max_new_tokens for q in requests
                                           if q.request_id == r.request_id)


@pytest.mark.parametrize("family", ["qwen2_vl", "gemma3"])
def test_questions_without_an_image_batch_apart_from_those_with(
        family: str, hf_backends: dict[str, HFBackend], example_images: list[ImageRef]) -> None:
    backend = hf_backends[family]
    with_image = _requests(example_images, 2)
    text_only = VLMRequest(request_id="free", stage=7, question="What is pleural effusion?",
                           max_new_tokens=6)
    requests = [with_image[0], text_only, with_image[1]]
    alone = [backend.generate_sync([r])[0] for r in requests]
    _same(backend.generate_sync(requests), alone)
    assert alone[1].prompt is not None and IMAGE_MARK[family] not in alone[1].prompt


def test_a_sampled_request_runs_alone_and_its_seed_repeats_it(
        hf_backends: dict[str, HFBackend], example_images: list[ImageRef]) -> None:
    backend = hf_backends["qwen2_vl"]
    request = _requests(example_images, 1)[0].model_copy(update={
        "decoding": DecodingSettings(temperature=1.5, seed=7), "max_new_tokens": 16})
    greedy = _requests(example_images, 2)[1]
    a = backend.generate_sync([request, greedy])
    b = backend.generate_sync([request])
    assert a[0].text == b[0].text
    assert a[1].text == backend.generate_sync([greedy])[0].text


# --- images ------------------------------------------------------------------------------


def _monochrome1(tmp_path: Path) -> Path:
    """The bundled DICOM stored inverted, as MONOCHROME1 (0 white)."""
    ds = pydicom.dcmread(EXAMPLES / "phantom_chest_pa.dcm")
    ds.decompress()  # JPEG lossless -> native
    arr = ds.pixel_array
    top = (1 << int(ds.BitsStored)) - 1
    ds.PixelData = (top - arr).astype(arr.dtype).tobytes()
    ds.PhotometricInterpretation = "MONOCHROME1"
    if "WindowCenter" in ds:  # the window, mirrored with the values
        ds.WindowCenter = top - float(ds.WindowCenter)
    path = tmp_path / "mono1.dcm"
    ds.save_as(path)
    return path


def test_dicom_monochrome1_and_16_bit_png_reach_the_processor_with_their_contrast(
        hf_backends: dict[str, HFBackend], tmp_path: Path) -> None:
    reference = np.asarray(to_pil(ImageRef(path=str(EXAMPLES / "phantom_chest_pa.png"))),
                           dtype=np.float64)
    backend = hf_backends["qwen2_vl"]
    for source in (EXAMPLES / "phantom_chest_pa.dcm", _monochrome1(tmp_path),
                   EXAMPLES / "phantom_chest_pa_16bit.png"):
        request = VLMRequest(request_id="r", stage=1, question="Which view is this image?",
                             images=[ImageRef(path=str(source))])
        _, (image,) = backend.prepare(request)
        assert image.mode == "RGB" and image.size == (reference.shape[1], reference.shape[0])
        pixels = np.asarray(image, dtype=np.float64)
        assert pixels.std() > 30, source  # not all white, not flat
        assert pixels.min() < 30 and pixels.max() > 200, source  # dark lungs, bright bone
        # the same anatomy as the 8-bit PNG, lungs dark (not inverted)
        assert np.corrcoef(pixels[..., 0].ravel(), reference[..., 0].ravel())[0, 1] > 0.9, \
            source


def test_images_go_to_the_processor_in_the_order_of_their_slots(
        hf_backends: dict[str, HFBackend], example_images: list[ImageRef]) -> None:
    backend = hf_backends["llava"]
    request = VLMRequest(request_id="r", stage=5, question="What changed?",
                         images=example_images[:2], context=[(2, "Findings?", "None.")])
    prompt, images = backend.prepare(request)
    turns = backend.dialect.chat(request)
    assert len(images) == sum(len(t.images) for t in turns) == 2
    order = [i for t in turns for i in t.images]
    expected = [to_pil(example_images[i]) for i in order]
    assert [im.tobytes() for im in images] == [im.tobytes() for im in expected]
    assert prompt.count("<image>") == 2


# --- loading -----------------------------------------------------------------------------


def test_the_default_dialect_comes_from_the_model_folder(vlm_folders: dict[str, Path],
                                                         tmp_path: Path) -> None:
    folder = tmp_path / "declared"
    shutil.copytree(vlm_folders["llava"], folder)
    general = "instruct" if "instruct" in DIALECTS else "cxrtrek"
    assert default_dialect(folder) == general
    config = json.loads((folder / "config.json").read_text())
    config[DIALECT_KEY] = DIALECTS[-1]
    (folder / "config.json").write_text(json.dumps(config))
    assert default_dialect(folder) == DIALECTS[-1]
    backend = load_backend(f"hf:{folder}", options=BackendOptions(device="cpu"))
    assert isinstance(backend, HFBackend) and backend.dialect.name == DIALECTS[-1]
    overridden = load_backend(f"hf:{folder}", options=BackendOptions(device="cpu",
                                                                     dialect="cxrtrek"))
    assert isinstance(overridden, HFBackend) and overridden.dialect.name == "cxrtrek"
    config[DIALECT_KEY] = "klingon"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=r"cxrtrek_dialect must be one of .*'klingon'"):
        load_backend(f"hf:{folder}")
    with pytest.raises(ConfigError, match="unknown dialect 'klingon'"):
        load_backend(f"hf:{vlm_folders['llava']}", options=BackendOptions(dialect="klingon"))


def test_a_real_qwen_checkpoint_folder_loads_without_torchvision(vlm_folders: dict[str, Path],
                                                                 tmp_path: Path) -> None:
    """Real folders name the stock processor (which needs torchvision for video): the
    image-only processor loads them all the same (AutoProcessor alone would return just the
    tokenizer, silently)."""
    for family, stock in (("qwen2_vl", "Qwen2VLProcessor"),
                          ("qwen2_5_vl", "Qwen2_5_VLProcessor")):
        folder = tmp_path / family
        shutil.copytree(vlm_folders[family], folder)
        for name in ("processor_config.json", "preprocessor_config.json"):
            path = folder / name
            if path.is_file():
                data = json.loads(path.read_text())
                data["processor_class"] = stock
                path.write_text(json.dumps(data))
        backend = load_backend(f"hf:{folder}", options=BackendOptions(device="cpu"))
        assert isinstance(backend, HFBackend)
        assert backend.processor.image_processor is not None
        assert type(backend.processor.image_processor).__name__ == "Qwen2VLImageProcessorPil"


def test_folders_that_are_not_image_text_to_text_models_get_a_clear_error(
        tmp_path: Path) -> None:
    assert "hf:PATH" in BACKEND_SPECS
    with pytest.raises(ConfigError, match="is not a folder"):
        load_backend(f"hf:{tmp_path / 'absent'}")
    with pytest.raises(ConfigError, match=r"has no config\.json"):
        load_backend(f"hf:{tmp_path}")
    with pytest.raises(ConfigError, match="is a CXRTrekNet folder; load it with inprocess:"):
        load_backend(f"hf:{demo_checkpoint()}")
    text_only = tmp_path / "llama"
    text_only.mkdir()
    (text_only / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ConfigError, match="'llama' model, which is not an image-text-to-text"):
        load_backend(f"hf:{text_only}")
    with pytest.raises(ConfigError, match="expected hf:PATH"):
        load_backend("hf:")
    with pytest.raises(ConfigError, match="CUDA is not available here"):
        load_backend(f"hf:{text_only}", options=BackendOptions(device="cuda:0"))
