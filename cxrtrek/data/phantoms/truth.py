"""The truth of a phantom: the finding and device kinds with their scales and names, the
typed truth of a study (:class:`PhantomFinding`, :class:`PhantomDevice`, :class:`PhantomAnatomy`,
:class:`PhantomTruth`, a prior's nested) and a rendered image (:class:`PhantomImage`)."""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Annotated, Literal

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field

F32 = npt.NDArray[np.float32]
Mask = npt.NDArray[np.bool_]

FindingKind = Literal["cardiomegaly", "effusion", "pneumothorax", "consolidation", "nodule",
                      "mass", "atelectasis", "edema", "rib_fracture"]
DeviceKind = Literal["endotracheal_tube", "central_line"]
Side = Literal["right", "left", "bilateral"]
Zone = Literal["upper", "middle", "lower", "perihilar"]
Change = Literal["new", "resolved", "increased", "decreased", "stable"]
Box = Annotated[list[float], Field(min_length=4, max_length=4)]

FIELD_CM = 40.0
"""Height (and width) of the imaged field in cm: converts image fractions to centimetres."""

# Sizes (or severities) of each kind, from least to most; the index is the finding's grade.
SCALES: dict[str, tuple[str, ...]] = {
    "cardiomegaly": ("mild", "moderate", "severe"),
    "edema": ("mild", "moderate", "severe"),
    "effusion": ("small", "moderate", "large"),
    "pneumothorax": ("small", "moderate", "large"),
    "consolidation": ("small", "moderate", "large"),
    "nodule": ("small", "moderate"),
    "mass": ("moderate", "large"),
    "atelectasis": ("small", "moderate"),
    "rib_fracture": (),
}
_SEVERITY_KINDS = frozenset({"cardiomegaly", "edema"})

NAMES: dict[str, str] = {
    "cardiomegaly": "cardiomegaly", "effusion": "pleural effusion",
    "pneumothorax": "pneumothorax", "consolidation": "consolidation",
    "nodule": "pulmonary nodule", "mass": "pulmonary mass", "atelectasis": "atelectasis",
    "edema": "pulmonary edema", "rib_fracture": "rib fracture",
    "endotracheal_tube": "endotracheal tube", "central_line": "central venous catheter",
}



class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PhantomFinding(_Model):
    """One finding: what, where, how big, its boxes and how it changed since the prior."""

    kind: FindingKind
    laterality: Side | None = None
    zone: Zone | None = None
    size: str | None = None
    """small / moderate / large (effusion, pneumothorax, consolidation, nodule, mass, ...)."""
    severity: str | None = None
    """mild / moderate / severe (cardiomegaly, edema)."""
    boxes: list[Box] = Field(default_factory=list)
    """Boxes on the image this truth describes (two for bilateral edema), percent 0-100."""
    change: Change | None = None
    """Versus the prior study; None when there is no prior."""
    geometry: dict[str, float] = Field(default_factory=dict)
    """Where the renderer draws it (fractions of the lung, radii, centimetres)."""

    @property
    def grade(self) -> int:
        """Index of the size/severity on the kind's scale (0 when it has none)."""
        word = self.severity if self.kind in _SEVERITY_KINDS else self.size
        scale = SCALES[self.kind]
        return scale.index(word) if word in scale else 0

    @property
    def name(self) -> str:
        return NAMES[self.kind]


class PhantomDevice(_Model):
    """A support device and where its tip lies."""

    kind: DeviceKind
    tip: str
    """``appropriate``/``low``/``high`` (tube), ``svc``/``cavoatrial``/``atrium`` (line)."""
    entry: str | None = None
    """Central line access: ``right internal jugular`` or ``left subclavian``."""
    tip_cm_above_carina: float | None = None
    box: Box
    """A box around the tip, percent 0-100."""
    change: Change | None = None

    @property
    def name(self) -> str:
        return NAMES[self.kind]

    @property
    def malpositioned(self) -> bool:
        return self.tip in ("low", "high", "atrium")


class PhantomAnatomy(_Model):
    """The patient's build: shared by all of a patient's studies."""

    thorax_half_width: float
    apex_y: float
    rib_spacing: float
    heart_height: float
    normal_ctr: float
    vessel_phase: float
    aorta: float


class PhantomTruth(_Model):
    """Everything true about one phantom study (and, nested, its prior)."""

    study_id: str
    patient_id: str
    prior_study_id: str | None = None
    size: int
    view: Literal["PA", "AP"]
    rotation: Literal["none", "right", "left"]
    inspiration: Literal["adequate", "poor", "hyperinflated"]
    posterior_ribs: int
    """Posterior ribs above the right hemidiaphragm (midclavicular line)."""
    exposure: Literal["adequate", "under", "over"]
    noise: float
    ctr: float = 0.0
    """Cardiothoracic ratio measured on the rendered masks; > 0.5 with cardiomegaly."""
    heart_box: Box = Field(default_factory=lambda: [0.0, 0.0, 0.0, 0.0])
    right_lung_box: Box = Field(default_factory=lambda: [0.0, 0.0, 0.0, 0.0])
    left_lung_box: Box = Field(default_factory=lambda: [0.0, 0.0, 0.0, 0.0])
    findings: list[PhantomFinding] = Field(default_factory=list)
    resolved: list[PhantomFinding] = Field(default_factory=list)
    """Findings of the prior study that are gone now (their boxes are on the prior image)."""
    devices: list[PhantomDevice] = Field(default_factory=list)
    removed_devices: list[PhantomDevice] = Field(default_factory=list)
    anatomy: PhantomAnatomy
    prior: PhantomTruth | None = None

    @property
    def normal(self) -> bool:
        return not self.findings

    def finding(self, kind: str) -> PhantomFinding | None:
        return next((f for f in self.findings if f.kind == kind), None)

    def device(self, kind: str) -> PhantomDevice | None:
        return next((d for d in self.devices if d.kind == kind), None)


@dataclass
class PhantomImage:
    """A rendered image: uint8 pixels, its masks (for checks) and its path in the dataset."""

    pixels: npt.NDArray[np.uint8]
    masks: dict[str, Mask]
    rel_path: str

    def png(self) -> bytes:
        """The image as PNG bytes, written deterministically (no metadata, fixed settings)."""
        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(self.pixels, mode="L").save(buf, format="PNG", compress_level=3)
        return buf.getvalue()


