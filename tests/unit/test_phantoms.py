"""Phantom studies: the truth matches the pixels, same seed same bytes, records parse to truth."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

import cxrtrek.data
from cxrtrek.data.cxrtrek import load_studies, read_records
from cxrtrek.data.phantoms import (
    PhantomAnatomy,
    PhantomFinding,
    PhantomImage,
    PhantomTruth,
    apply_rules,
    generate,
    make_study,
)
from cxrtrek.errors import ConfigError, DataError
from cxrtrek.parsing import parse_answer, parse_options
from cxrtrek.schema import BoxesParse, ChoiceParse, ReportParse, YesNoParse

Study = tuple[list[PhantomImage], PhantomTruth, object]


@pytest.fixture(scope="module")
def studies() -> list[tuple[list[PhantomImage], PhantomTruth, object]]:
    return [make_study(np.random.default_rng([11, i]), index=i, seed=11) for i in range(80)]


def _boxes(t: PhantomTruth) -> list[list[float]]:
    out = [t.heart_box, t.right_lung_box, t.left_lung_box]
    out += [b for f in t.findings for b in f.boxes] + [d.box for d in t.devices]
    return out


def test_every_box_lies_inside_the_image_and_the_thorax(studies: list[Study]) -> None:
    for images, t, _ in studies:
        body = images[0].masks["body"]
        rows, cols = np.flatnonzero(body.any(axis=1)), np.flatnonzero(body.any(axis=0))
        s = t.size
        bx1, by1 = 100 * cols[0] / s, 100 * rows[0] / s
        bx2, by2 = 100 * (cols[-1] + 1) / s, 100 * (rows[-1] + 1) / s
        for f in t.findings:
            assert f.kind == "cardiomegaly" or f.boxes, f"{f.kind} has no box"
        for x1, y1, x2, y2 in _boxes(t):
            assert 0 <= x1 < x2 <= 100 and 0 <= y1 < y2 <= 100
            assert bx1 <= x1 and x2 <= bx2 and by1 <= y1 and y2 <= by2


def test_lesions_are_brighter_than_the_mirrored_healthy_lung(studies: list[Study]) -> None:
    checked = 0
    for images, t, _ in studies:
        masks, px = images[0].masks, images[0].pixels.astype(np.float64)
        others = np.zeros_like(masks["heart"])
        for f in t.findings:
            if f.kind in masks:
                others |= masks[f.kind]
        for f in t.findings:
            if f.kind not in ("nodule", "mass", "consolidation"):
                continue
            m = masks[f.kind]
            other_lung = masks["left_lung" if f.laterality == "right" else "right_lung"]
            mirror = np.fliplr(m) & other_lung & ~others & ~masks["heart"]
            if mirror.sum() < 0.5 * m.sum():
                continue  # the mirror image falls on the heart or on another finding
            assert px[m].mean() > px[mirror].mean() + 15, f.kind
            checked += 1
    assert checked >= 5


def _erode(m: np.ndarray, k: int = 2) -> np.ndarray:
    out = m.copy()
    for _ in range(k):
        out[1:] &= out[:-1].copy()
        out[:-1] &= out[1:].copy()
        out[:, 1:] &= out[:, :-1].copy()
        out[:, :-1] &= out[:, 1:].copy()
    return out


def test_pneumothorax_has_no_lung_markings_beyond_the_pleural_line() -> None:
    checked = 0
    i = 0
    while checked < 4 and i < 400:
        images, t, _ = make_study(np.random.default_rng([12, i]), prior_fraction=0.0)
        i += 1
        ptx = t.finding("pneumothorax")
        if ptx is None or t.finding("rib_fracture") is not None:
            continue
        masks, px = images[0].masks, images[0].pixels.astype(np.float64)
        region = _erode(masks["pneumothorax"])
        other = masks["left_lung" if ptx.laterality == "right" else "right_lung"]
        mirror = _erode(np.fliplr(masks["pneumothorax"]) & other)
        if region.sum() < 30 or mirror.sum() < 30:
            continue
        # markings make the healthy side vary; beyond the pleural line there is only noise
        # (and ribs, which both sides share)
        assert px[region].std() < px[mirror].std(), (px[region].std(), px[mirror].std())
        assert px[region].mean() < px[mirror].mean() + 5  # air, not a density
        checked += 1
    assert checked == 4


def test_ctr_measured_on_the_heart_mask_matches_the_truth(studies: list[Study]) -> None:
    for images, t, _ in studies:
        m = images[0].masks
        hcols = np.flatnonzero(m["heart"].any(axis=0))
        lungs = m["right_lung_outline"] | m["left_lung_outline"]
        tcols = np.flatnonzero(lungs.any(axis=0))
        ctr = (hcols[-1] - hcols[0] + 1) / (tcols[-1] - tcols[0] + 1)
        assert abs(ctr - t.ctr) < 0.005
        assert (t.finding("cardiomegaly") is not None) == (t.ctr > 0.5), t.ctr


def test_same_seed_same_bytes_other_seed_differs(tmp_path: Path) -> None:
    def files(root: Path) -> dict[str, bytes]:
        return {p.relative_to(root).as_posix(): p.read_bytes()
                for p in sorted(root.rglob("*")) if p.is_file()}

    a = files(generate(5, 7, tmp_path / "a").parent)
    b = files(generate(5, 7, tmp_path / "b").parent)
    c = files(generate(5, 8, tmp_path / "c").parent)
    assert a == b
    assert {"phantoms.json", "truth.jsonl"} <= set(a)
    assert a["phantoms.json"] != c["phantoms.json"]
    assert [v for k, v in sorted(a.items()) if k.endswith(".png")] != \
        [v for k, v in sorted(c.items()) if k.endswith(".png")]
    # workers drawing studies side by side write the same bytes, in the same order
    counted: list[int] = []
    d = files(generate(120, 7, tmp_path / "d", size=128, workers=2,
                       progress=counted.append).parent)
    e = files(generate(120, 7, tmp_path / "e", size=128).parent)
    assert d == e and sum(counted) == 120 and len(counted) == 3  # three batches of 50 at most
    with pytest.raises(DataError, match="workers"):
        generate(1, 7, tmp_path / "f", workers=0)


def test_the_bundled_study_is_what_its_readme_regenerates(tmp_path: Path) -> None:
    """The bundled study was written by an earlier generator: the command in its README must
    write it again, pixel for pixel and byte for byte in the text files."""
    from PIL import Image

    bundled = Path(cxrtrek.data.__file__).parent / "studies" / "phantom_with_prior"
    readme = (bundled.parent / "README.md").read_text(encoding="utf-8")
    assert "cxrtrek phantoms --n 1 --seed 1 --size 160 --out" in readme
    out = generate(1, 1, tmp_path, size=160).parent
    names = sorted(p.relative_to(bundled).as_posix() for p in bundled.rglob("*") if p.is_file())
    assert names == sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    for name in names:
        if name.endswith(".png"):
            with Image.open(bundled / name) as a, Image.open(out / name) as b:
                assert (a.mode, a.size) == (b.mode, b.size) and a.tobytes() == b.tobytes(), name
        else:
            assert (out / name).read_bytes() == (bundled / name).read_bytes(), name


def test_records_read_back_and_every_answer_parses_to_the_truth(tmp_path: Path) -> None:
    path = generate(12, 3, tmp_path / "ds", size=256)
    records = read_records(path)
    studies = load_studies(path)  # images resolved under the file's folder
    assert len(records) == len(studies) == 12
    for record, study in zip(records, studies, strict=True):
        data = record.data
        assert data is not None
        assert all(Path(ref.path or "").is_file() for ref in study.images)
        assert (study.prior is not None) == bool(data.ref_study_id)
        assert 12 <= len(data.content) <= 36
        for item in data.content:
            parsed = parse_answer(item.answer, qtype=item.qtype, task_type=item.task_type,
                                  options=item.option_list or ())
            if item.option_list is not None:
                assert isinstance(parsed, ChoiceParse), (item.question, parsed)
                assert parsed.selected == item.answer_list
                assert parse_options(item.question) == item.option_list
            elif item.qtype == "detection":
                assert isinstance(parsed, BoxesParse), parsed
                assert [b.as_list() for b in parsed.boxes] == item.bbox_list
                assert item.image_id == 1 and item.num_of_images == len(data.image)
            elif item.qtype == "yes_no":
                assert isinstance(parsed, YesNoParse), parsed
            elif item.task_type.startswith("Report_Generation"):
                assert isinstance(parsed, ReportParse), parsed
                if item.task_type.endswith("[ALL]"):
                    assert parsed.findings and parsed.impression


_TARGET = re.compile(r"^(?:\w+_\[)?(?P<name>[^\]]+)\]?$")
_ANATOMY = {"heart", "right lung", "left lung"}


def test_stage_dependencies_hold(studies: list[Study]) -> None:
    for _, t, record in studies:
        data = record.data  # type: ignore[attr-defined]
        stages = [item.stage for item in data.content]
        assert stages == sorted(stages)
        assert (5 in stages) == (t.prior is not None)
        assert {1, 2, 3, 4, 6, 7, 8} <= set(stages)
        present = {f.name for f in t.findings} | {d.name for d in t.devices}
        said_no = {_TARGET.match(i.target).group("name")  # type: ignore[union-attr]
                   for i in data.content
                   if i.stage == 2 and i.qtype == "yes_no" and i.target
                   and i.answer.startswith("No")}
        assert not said_no & present
        for item in data.content:
            if item.stage != 3 or not item.target:
                continue
            name = _TARGET.match(item.target).group("name")  # type: ignore[union-attr]
            name = name.removesuffix(" tip")
            if name in said_no:
                assert item.qtype == "yes_no" and item.answer.startswith("No"), item
            else:
                assert name in present | _ANATOMY, (name, present)


def test_truth_matches_the_answers_of_stage_1_and_2(studies: list[Study]) -> None:
    for _, t, record in studies:
        data = record.data  # type: ignore[attr-defined]
        for item in data.content:
            if item.task_type == "View_Information" and item.answer_list:
                assert f"({t.view})" in item.answer_list[0]
            if item.stage == 2 and item.qtype == "yes_no" and item.target:
                name = _TARGET.match(item.target).group("name")  # type: ignore[union-attr]
                present = any(f.name == name for f in t.findings)
                assert item.answer.startswith("Yes") == present
        report = [i.answer for i in data.content if i.task_type == "Report_Generation[ALL]"]
        for text in report:
            for f in t.findings:
                assert f.name.split()[-1] in text.lower()


def _truth(*findings: PhantomFinding) -> PhantomTruth:
    anatomy = PhantomAnatomy(thorax_half_width=0.36, apex_y=0.13, rib_spacing=0.052,
                             heart_height=0.11, normal_ctr=0.44, vessel_phase=1.0, aorta=0.03)
    return PhantomTruth(study_id="s", patient_id="p", size=320, view="PA", rotation="none",
                        inspiration="adequate", posterior_ribs=10, exposure="adequate",
                        noise=0.01, findings=list(findings), anatomy=anatomy)


def test_rule_table_gives_reasonable_advice() -> None:
    large_ptx = _truth(PhantomFinding(kind="pneumothorax", laterality="left", zone="upper",
                                      size="large"))
    fired = apply_rules(large_ptx)
    assert len(fired) == 1 and fired[0].rule.urgent
    assert "decompression" in fired[0].advice and "left" in fired[0].diagnosis
    chf = apply_rules(_truth(PhantomFinding(kind="cardiomegaly", severity="mild"),
                             PhantomFinding(kind="edema", laterality="bilateral",
                                            zone="perihilar", severity="moderate")))
    assert [f.diagnosis for f in chf] == ["congestive heart failure"]
    assert "diuresis" in chf[0].advice and "echocardiography" in chf[0].advice
    assert chf[0].relation
    eff = apply_rules(_truth(
        PhantomFinding(kind="effusion", laterality="right", zone="lower", size="small"),
        PhantomFinding(kind="atelectasis", laterality="right", zone="lower", size="small")))
    assert "compressive" in eff[0].relation
    assert apply_rules(_truth()) == []


def test_bad_size_is_refused() -> None:
    with pytest.raises(ConfigError, match="128-512"):
        make_study(0, size=64)


def test_cli_writes_a_dataset(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from cxrtrek.interfaces.cli import main

    assert main(["phantoms", "--n", "2", "--seed", "4", "--out", str(tmp_path),
                 "--size", "160"]) == 0
    assert capsys.readouterr().out.strip().endswith("phantoms.json")
    assert len(read_records(tmp_path / "phantoms.json")) == 2
    assert len((tmp_path / "truth.jsonl").read_text().splitlines()) == 2
    assert main(["phantoms", "--n", "1", "--out", str(tmp_path), "--size", "64"]) == 2
