"""A radiologist's line measurements in a PACS as a job's prompts (``"lines_from_pacs": true``):
the study's SR documents and presentation states (QIDO-RS + WADO-RS,
:func:`msam_service.pacs.dicomweb.retrieve_annotations`), their lines on the job's series
(:func:`msam_core.io.annotations.find_lines`), one lesion per line, prompted by it."""

from __future__ import annotations

from msam_core.errors import InvalidPrompt
from msam_core.io.annotations import find_lines
from msam_core.io.volume import Volume
from msam_service.contract import LesionDocument, PromptDocument
from msam_service.pacs import dicomweb
from msam_service.pacs.nodes import DicomwebNode


def prompts_from_lines(node: DicomwebNode, study_uid: str, volume: Volume, *, max_lesions: int,
                       timeout: float) -> PromptDocument:
    """The prompt document (:mod:`msam_service.prompts`) of the study's line measurements on
    ``volume``'s series: LPS lines, ``line_source`` ``SR`` or ``GSPS``, labels ``"SR line 1"``...

    Raises:
        InvalidPrompt: no line on this series, or more than ``max_lesions``.
        PacsError: the node could not be searched.
    """
    found = find_lines(dicomweb.retrieve_annotations(node, study_uid, timeout=timeout), volume)
    if not found:
        raise InvalidPrompt(f"no line measurement on this series was found in the study on {node.name} (DICOM SR "
                            "SCOORD/SCOORD3D polylines, GSPS polylines in PIXEL units); send prompts instead")
    if len(found) > max_lesions:
        raise InvalidPrompt(f"the study holds {len(found)} line measurements on this series; at most "
                            f"{max_lesions} lesions per job (MSAM_MAX_LESIONS)")
    lesions: list[LesionDocument] = [
        {"line": [list(f.start_lps), list(f.end_lps)], "line_source": f.source, "label": f"{f.source} line {n}"}
        for n, f in enumerate(found, start=1)]
    return {"space": "LPS", "lesions": lesions, "iterations": 1}
