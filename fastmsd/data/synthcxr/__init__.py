"""synthcxr: procedurally drawn chest radiographs with matching MIMIC-style reports.

The set is written in the MIMIC-CXR-JPG 2.0.0 layout (JPEGs, reports, split / metadata /
CheXpert CSVs) plus a small DICOM subset, so the real MIMIC readers run on it unchanged.
Everything is deterministic per ``seed``: the study plan comes from one generator seeded by
``seed`` and every image / report from generators seeded by ``(seed, item index)``, so an
item regenerates identically whatever the order or the number of worker processes.

Orientation follows the radiographic convention: the patient's right is on the image left.

Modules: :mod:`.cohort` plans the studies, :mod:`.radiograph` draws an image (from
:mod:`.anatomy` and :mod:`.findings` on :mod:`.raster` primitives), :mod:`.reports` writes
its report, :mod:`.writer` writes the set and :mod:`.preview` shows some of it.
"""

from .labels import CHEXPERT_COLUMNS, FINDINGS, ZEROSHOT_CLASSES
from .preview import preview
from .radiograph import render_image
from .reports import write_report
from .writer import generate

__all__ = [
    "FINDINGS",
    "ZEROSHOT_CLASSES",
    "CHEXPERT_COLUMNS",
    "generate",
    "preview",
    "render_image",
    "write_report",
]
