"""Small files in the public layouts of VQA-RAD, SLAKE, ReXVQA, MIMIC-CXR-VQA and
ChestAgentBench (field names, casing, answer spellings and image folders as the datasets
have them), with images made here. Each writer returns the data file and what the file holds,
so that tests can say what a reader must keep and skip."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image


def _image(path: Path, shade: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", (48, 40), color=shade % 256).save(path)


@dataclass
class Written:
    """A benchmark file written by a test."""

    path: Path
    records: list[dict[str, Any]]
    kept: int
    """Records the reader keeps (with the options the writer names)."""
    skipped: dict[str, int] = field(default_factory=dict)
    image_root: Path | None = None
    """Pass as --image-root (None: the format's own default finds the images)."""
    options: dict[str, str] = field(default_factory=dict)
    """Reader options the counts assume (organ, split)."""


def write_jsonl(records: list[dict[str, Any]], path: Path) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


# --- VQA-RAD ---------------------------------------------------------------------------------

_RAD_CHEST: list[tuple[str, Any, str, str]] = [
    # question, answer, answer_type (as the file spells it), question_type
    ("Is there a pneumothorax?", "Yes", "CLOSED", "PRES"),
    ("Is there evidence of a pleural effusion?", "no", "CLOSED", "PRES"),
    ("Is the heart enlarged?", "yes", "CLOSED ", "SIZE"),
    ("Is this a PA film?", "No", "closed", "PLANE"),
    ("Which side is the effusion on?", "Left", "CLOSED", "POS"),
    ("Is the mass on the left or right?", "right", "CLOSED", "PRES, POS"),
    ("What imaging modality was used?", "X-ray", "OPEN", "MODALITY"),
    ("How many nodules are seen?", 2, "OPEN", "COUNT"),
    ("Where is the abnormality located?", "Right upper lobe", "OPEN", "POS"),
    ("What is the abnormality in the left lung base?", "consolidation", "OPEN", "ABN"),
    ("What organ system is pictured?", "chest", "OPEN", "ORGAN"),
    ("What is abnormal about the mediastinum?", "widened mediastinum", "OPEN", "OTHER"),
]


def write_vqa_rad(folder: Path, *, jsonl: bool = False) -> Written:
    """24 chest questions (4 of them test questions) and 6 head/abdomen ones; the public
    file's name and image folder."""
    images = folder / "VQA_RAD Image Folder"
    records: list[dict[str, Any]] = []
    qid = 100
    for round_ in range(2):
        for k, (q, a, at, qt) in enumerate(_RAD_CHEST):
            qid += 1
            name = f"synpic{50000 + k + 20 * round_}.jpg"
            _image(images / name, 40 + k)
            records.append({
                "qid": qid, "image_name": name,
                "image_case_url": f"https://medpix.nlm.nih.gov/case?id={qid}",
                "image_organ": "CHEST", "answer": a, "answer_type": at,
                "question_type": qt, "question": q,
                "phrase_type": "test_freeform" if k in (0, 6) else ("freeform" if round_ == 0
                                                                     else "para"),
                "question_relation": "NULL", "question_frame": "NULL",
                "qid_linked_id": f"{qid:05d}", "evaluation": "given"})
    for k, organ in enumerate(["HEAD", "HEAD", "HEAD", "ABD", "ABD", "ABD"]):
        qid += 1
        name = f"synpic{60000 + k}.jpg"
        _image(images / name, 90 + k)
        records.append({
            "qid": qid, "image_name": name, "image_organ": organ, "answer": "Yes",
            "answer_type": "CLOSED", "question_type": "PRES",
            "question": "Is there a mass?", "phrase_type": "freeform"})
    path = folder / ("VQA_RAD Dataset Public.jsonl" if jsonl else "VQA_RAD Dataset Public.json")
    if jsonl:
        write_jsonl(records, path)
    else:
        path.write_text(json.dumps(records, indent=2), encoding="utf-8")
    return Written(path, records, kept=24, options={"organ": "CHEST"},
                   skipped={"image_organ HEAD, not CHEST": 3, "image_organ ABD, not CHEST": 3})


# --- SLAKE -----------------------------------------------------------------------------------

_SLAKE_EN: list[tuple[str, str, str, str]] = [
    # question, answer, answer_type, content_type
    ("What modality is used to take this image?", "X-Ray", "OPEN", "Modality"),
    ("Which part of the body does this image belong to?", "Chest", "OPEN", "Organ"),
    ("Does the picture contain lung?", "Yes", "CLOSED", "Organ"),
    ("Is the lung healthy?", "No", "CLOSED", "Abnormality"),
    ("What diseases are included in the picture?", "Pneumothorax", "OPEN", "Abnormality"),
    ("Where is the abnormality?", "Left Lung, Upper Right", "OPEN", "Position"),
    ("Which is the biggest in this image, lung, liver or heart?", "Lung", "CLOSED", "Size"),
    ("How many lungs are there in this image?", "2", "OPEN", "Quantity"),
    ("Is this image taken via X-Ray?", "yes", "CLOSED", "Modality"),
    ("Which organ is abnormal, heart or lung?", "Lung", "CLOSED", "Position"),
    ("What is the main cause of the disease in this image?", "Smoking, infection", "OPEN",
     "KG"),
    ("What is the shape of the heart in this image?", "Irregular", "OPEN", "Shape"),
]


def write_slake(folder: Path) -> Written:
    """24 English X-ray questions, 4 Chinese and 4 CT/MRI ones; ``test.json`` with images
    under ``imgs/``."""
    records: list[dict[str, Any]] = []
    qid = 0
    for round_ in range(2):
        for k, (q, a, at, ct) in enumerate(_SLAKE_EN):
            qid += 1
            name = f"xmlab{k + 20 * round_}/source.jpg"
            _image(folder / "imgs" / name, 10 + k)
            records.append({
                "img_id": k + 20 * round_, "img_name": name, "question": q, "answer": a,
                "q_lang": "en", "location": "Lung", "modality": "X-Ray", "answer_type": at,
                "base_type": "vqa", "content_type": ct, "triple": ["vhead", "_", "_"],
                "qid": qid})
    for _ in range(4):
        qid += 1
        records.append({
            "img_id": 90, "img_name": "xmlab90/source.jpg", "question": "这张图片是什么模态?",
            "answer": "X光", "q_lang": "zh", "location": "Lung", "modality": "X-Ray",
            "answer_type": "OPEN", "base_type": "vqa", "content_type": "Modality",
            "triple": ["vhead", "_", "_"], "qid": qid})
    for k, modality in enumerate(["CT", "CT", "MRI", "MRI"]):
        qid += 1
        records.append({
            "img_id": 100 + k, "img_name": f"xmlab{100 + k}/source.jpg",
            "question": "Is the liver healthy?", "answer": "Yes", "q_lang": "en",
            "location": "Abdomen", "modality": modality, "answer_type": "CLOSED",
            "base_type": "vqa", "content_type": "Abnormality", "triple": ["vhead", "_", "_"],
            "qid": qid})
    path = folder / "test.json"
    path.write_text(json.dumps(records, ensure_ascii=False, indent=1), encoding="utf-8")
    return Written(path, records, kept=24,
                   skipped={"q_lang zh, not en": 4, "modality CT, not X-Ray": 2,
                            "modality MRI, not X-Ray": 2})


# --- ReXVQA ----------------------------------------------------------------------------------

_REX: list[tuple[str, str, list[str], str]] = [
    # task_name, question, options (text), correct letter
    ("Presence Assessment", "Is there evidence of pleural effusion in this chest X-ray?",
     ["Yes, on the left", "Yes, on the right", "No pleural effusion", "Cannot be determined"],
     "C"),
    ("Location Analysis", "Where is the opacity located?",
     ["Right upper lobe", "Right lower lobe", "Left upper lobe", "Left lower lobe"], "B"),
    ("Negation Detection", "Which finding is NOT present in this study?",
     ["Cardiomegaly", "Pneumothorax", "Atelectasis", "Pleural effusion"], "B"),
    ("Differential Diagnosis", "What is the most likely diagnosis?",
     ["Pneumonia", "Pulmonary edema", "Lung cancer", "Sarcoidosis"], "A"),
    ("Geometric Information", "How large is the cardiac silhouette?",
     ["Normal size", "Mildly enlarged", "Moderately enlarged", "Severely enlarged"], "D"),
]


def write_rexvqa(folder: Path) -> Written:
    """25 questions (5 of each task): ``metadata/test_vqa_data.json`` keyed by question id,
    images under ``deid_png/`` named ``../deid_png/...`` as in the release."""
    data: dict[str, dict[str, Any]] = {}
    for i in range(25):
        task, q, opts, letter = _REX[i % 5]
        study = f"GRDN{1000 + i}"
        rel = f"deid_png/GRDNP{200 + i}/{study}/studies/1.2.{i}/series/1.3.{i}/instances/" \
              f"1.4.{i}.png"
        _image(folder / rel, 60 + i)
        data[f"{study}_{task.lower().replace(' ', '_')}_{i}"] = {
            "question": q, "options": [f"{chr(65 + j)}. {o}" for j, o in enumerate(opts)],
            "correct_answer": letter,
            "correct_answer_explanation": "The finding is described in the report.",
            "task_name": task, "category": "Lungs", "class": "detail", "subcategory": "n/a",
            "study_id": study, "StudyInstanceUid": f"1.2.{i}", "PatientID": f"GRDNP{200 + i}",
            "PatientAge": "063Y", "PatientSex": "F", "StudyDate": "20200101",
            "Indication": "Cough.", "Findings": "Findings text.", "Impression": "Impression.",
            "ImageModality": ["DX"], "ImageViewPosition": ["PA"], "ImagePath": [f"../{rel}"]}
    meta = folder / "metadata"
    meta.mkdir(parents=True, exist_ok=True)
    path = meta / "test_vqa_data.json"
    path.write_text(json.dumps(data, indent=1), encoding="utf-8")
    return Written(path, list(data.values()), kept=25)


# --- MIMIC-CXR-VQA ---------------------------------------------------------------------------

_MIMIC: list[tuple[str, str, str, list[str]]] = [
    # semantic_type, content_type, question, answer
    ("verify", "presence", "Is there any evidence of pleural effusion?", ["yes"]),
    ("verify", "attribute",
     "Are there signs of both pleural effusion and lung cancer in the left lower lung zone?",
     ["no"]),
    ("verify", "plane", "Is this an AP view image?", ["yes"]),
    ("verify", "gender", "Is this patient female?", ["no"]),
    ("choose", "plane", "Which view is this image, AP or PA?", ["pa"]),
    ("choose", "anatomy", "Which anatomical location is related to atelectasis, the left lung "
     "or the right lung?", ["left lung", "right lung"]),
    ("query", "anatomy", "List all anatomical locations related to lung opacity.",
     ["left lower lung zone", "right lower lung zone"]),
    ("query", "abnormality", "List all abnormalities in the left lung.", []),
    ("query", "attribute", "What are the tubes/lines seen in the image?", ["picc"]),
    ("query", "size", "Which findings related to size are seen?", ["enlarged cardiac silhouette"]),
    ("verify", "abnormality", "Are there any abnormalities in the right lung?", ["yes"]),
    ("verify", "size", "Is the cardiac silhouette enlarged?", ["yes"]),
]


def write_mimic_cxr_vqa(folder: Path) -> Written:
    """24 built test records and 4 train records (``--split test`` keeps 24); images under a
    MIMIC-CXR-JPG-like ``files/`` folder, which is the image root."""
    files = folder / "mimic-cxr-jpg" / "2.0.0" / "files"
    records: list[dict[str, Any]] = []
    for i in range(28):
        st, ct, q, a = _MIMIC[i % len(_MIMIC)]
        subject, study = 10000032 + i, 50414267 + i
        dicom = f"{i:08x}-5a19ccad-7b5e431c-4e1dbb28-42a325c0"
        rel = f"p{str(subject)[:2]}/p{subject}/s{study}/{dicom}.jpg"
        _image(files / rel, 30 + i)
        records.append({
            "split": "test" if i < 24 else "train", "idx": 13280 + i, "subject_id": subject,
            "study_id": study, "image_id": dicom, "image_path": rel, "question": q,
            "semantic_type": st, "content_type": ct, "template": q,
            "template_program": f"program_{1 + i % 48}",
            "template_arguments": {"object": {}, "attribute": {}, "category": {},
                                   "viewpos": {}, "gender": {}},
            "answer": sorted(a)})
    dataset = folder / "mimiccxrvqa" / "dataset"
    dataset.mkdir(parents=True, exist_ok=True)
    path = dataset / "test.json"
    path.write_text(json.dumps(records, indent=4), encoding="utf-8")
    return Written(path, records, kept=24, skipped={"split train, not test": 4},
                   image_root=files, options={"split": "test"})


# --- ChestAgentBench -------------------------------------------------------------------------

_CAB: list[tuple[str, str, str]] = [
    # categories (as the release writes them), question, answer
    ("detection,localization,characterization,reasoning",
     "A 54-year-old man presents with cough. Based on Figure 1, where is the cavitating "
     "lesion and what are its margins?\nA) Right upper lobe, thick irregular wall\n"
     "B) Left upper lobe, thin smooth wall\nC) Right lower lobe, no wall\n"
     "D) Left lower lobe, calcified wall\nE) Lingula, thin wall\nF) No lesion is seen", "A"),
    ("detection,classification,relationship,reasoning",
     "Looking at Figure 1 and Figure 2a, which finding accompanies the pleural effusion? "
     "A) Pneumothorax B) Mediastinal shift to the left C) Rib fracture "
     "D) Elevated hemidiaphragm E) Consolidation F) Pneumomediastinum", "B"),
    ("localization,comparison,relationship,reasoning",
     "Comparing the two lungs in Figure 1, which zone is most affected?\n"
     "A) Right upper zone\nB) Right middle zone\nC) Right lower zone\nD) Left upper zone\n"
     "E) Left middle zone\nF) Left lower zone", "F"),
    ("classification,comparison,diagnosis,reasoning",
     "Given the history and Figure 1, what is the most likely diagnosis?\n"
     "A) Sarcoidosis\nB) Tuberculosis\nC) Lymphoma\nD) Silicosis\nE) Pneumonia\n"
     "F) Metastases", "D"),
    ("classification,characterization,diagnosis,reasoning",
     "Which description of the opacity in Figure 1 fits the final diagnosis?\n"
     "A) Ground-glass, diffuse\nB) Nodular, upper zone\nC) Reticular, basal\n"
     "D) Consolidation, lobar\nE) Mass-like, hilar\nF) Miliary, diffuse", "E"),
]


def write_chestagentbench(folder: Path, *, as_json: bool = False) -> Written:
    """25 questions over 5 cases (5 each) in ``metadata.jsonl`` with ``figures/<case>/``,
    plus 2 the reader skips (no images; no lettered options)."""
    records: list[dict[str, Any]] = []
    for i in range(25):
        cats, q, letter = _CAB[i % 5]
        case = str(2360 + i // 5)
        figs = [f"figures/{case}/figure_1.jpg"] + ([f"figures/{case}/figure_2a.jpg"]
                                                  if i % 5 == 1 else [])
        for f in figs:
            _image(folder / f, 120 + i)
        qid = f"{case}_{8353802248292 + i}"
        records.append({
            "question_id": qid, "full_question_id": f"{case}_{qid}", "case_id": case,
            "question": q, "answer": letter, "explanation": "The case discussion says so.",
            "images": figs, "image_source_urls": [f"https://www.eurorad.org/{f}" for f in figs],
            "categories": cats, "difficulty": "complex",
            "type": "multiple choice (A/B/C/D/E/F)"})
    records.append({"question_id": "2399_1", "full_question_id": "2399_2399_1",
                    "case_id": "2399", "question": _CAB[0][1], "answer": "A",
                    "explanation": "", "images": [], "categories": _CAB[0][0]})
    records.append({"question_id": "2399_2", "full_question_id": "2399_2399_2",
                    "case_id": "2399", "question": "Describe the lesion in Figure 1.",
                    "answer": "A", "explanation": "", "images": ["figures/2360/figure_1.jpg"],
                    "categories": _CAB[0][0]})
    if as_json:
        path = folder / "chestagentbench.json"
        path.write_text(json.dumps(records, indent=1), encoding="utf-8")
    else:
        path = write_jsonl(records, folder / "metadata.jsonl")
    return Written(path, records, kept=25,
                   skipped={"no image paths": 1, "no lettered options in the question": 1})


WRITERS = {"vqa-rad": write_vqa_rad, "slake": write_slake, "rexvqa": write_rexvqa,
           "mimic-cxr-vqa": write_mimic_cxr_vqa, "chestagentbench": write_chestagentbench}
