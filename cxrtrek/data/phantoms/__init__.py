"""Phantom studies: procedural chest radiographs whose findings are known, with 8-stage questions.

For tests, benchmarks, training and demos, never for clinical claims. A phantom is a grayscale
frontal radiograph drawn with vectorised numpy from a :class:`PhantomTruth`: body and soft
tissue, lungs with vascular markings, heart and mediastinum, trachea and carina, diaphragm
domes with sharp costophrenic angles, posterior and anterior ribs, clavicles, scapulae, spine.
Acquisition factors change the picture the way they change a real film: an AP view magnifies
the heart and lays the scapulae over the lungs, rotation moves the medial clavicle heads off
the midline, inspiration sets how many posterior ribs lie above the right hemidiaphragm,
exposure and noise change brightness, contrast and mottle.

Findings carry laterality, zone, size or severity and boxes (percent of the image, measured on
the rendered masks): cardiomegaly, pleural effusion, pneumothorax, consolidation, nodule, mass,
atelectasis, pulmonary edema, rib fracture; devices (endotracheal tube, central venous catheter)
carry their tip position. About 60% of patients have a prior study whose findings changed in a
controlled way (new, resolved, increased, decreased, stable).

The questions of all eight CXRTrek stages are written from the truth, so every reference
answer is true by construction; stages 4, 6 and 7 follow from the findings through one rule
table, :data:`RULES`.

Public API: :func:`make_study` (in memory), :func:`generate` (a dataset folder), the truth
types :class:`PhantomTruth`, :class:`PhantomFinding`, :class:`PhantomDevice` and the rendered
:class:`PhantomImage`.

The package follows the steps a phantom is made in, one module each, every import pointing to
an earlier one: :mod:`~cxrtrek.data.phantoms.truth` (the types), ``sampling`` (a truth drawn at
random), ``rendering`` (its image), ``rules`` (what its findings imply), ``text`` (sentences
about it), ``questions`` (the eight stages' questions and answers) and ``studies`` (a study, a
dataset folder).
"""

from __future__ import annotations

from cxrtrek.data.phantoms.questions import (
    DESCRIBE_PROMPT,
    describe_image,
)
from cxrtrek.data.phantoms.rules import (
    RULES,
    FiredRule,
    Rule,
    apply_rules,
)
from cxrtrek.data.phantoms.sampling import (
    Rng as Rng,
)
from cxrtrek.data.phantoms.studies import (
    SIZE_RANGE as SIZE_RANGE,
)
from cxrtrek.data.phantoms.studies import (
    generate,
    make_study,
    truth_images,
)
from cxrtrek.data.phantoms.text import report_findings
from cxrtrek.data.phantoms.truth import (
    F32 as F32,
)
from cxrtrek.data.phantoms.truth import (
    FIELD_CM as FIELD_CM,
)
from cxrtrek.data.phantoms.truth import (
    NAMES,
    SCALES,
    PhantomAnatomy,
    PhantomDevice,
    PhantomFinding,
    PhantomImage,
    PhantomTruth,
)
from cxrtrek.data.phantoms.truth import (
    Box as Box,
)
from cxrtrek.data.phantoms.truth import (
    Change as Change,
)
from cxrtrek.data.phantoms.truth import (
    DeviceKind as DeviceKind,
)
from cxrtrek.data.phantoms.truth import (
    FindingKind as FindingKind,
)
from cxrtrek.data.phantoms.truth import (
    Mask as Mask,
)
from cxrtrek.data.phantoms.truth import (
    Side as Side,
)
from cxrtrek.data.phantoms.truth import (
    Zone as Zone,
)

__all__ = [
    "DESCRIBE_PROMPT",
    "NAMES",
    "RULES",
    "SCALES",
    "FiredRule",
    "PhantomAnatomy",
    "PhantomDevice",
    "PhantomFinding",
    "PhantomImage",
    "PhantomTruth",
    "Rule",
    "apply_rules",
    "describe_image",
    "generate",
    "make_study",
    "report_findings",
    "truth_images",
]
