"""The inference service (``report_service.ReportService``): load once, stream sections,
explain, compare with the ground truth; what it answers is in ``answers``.

This face only hands the names on, as ``transformers.models.llama`` does.
"""

from mrg.service.answers import (
    Comparison,
    LabelRow,
    Manual,
    ReportUpdate,
    StudyFindings,
    StudyRefused,
    report_sentences,
)
from mrg.service.models import ServiceInfo
from mrg.service.report_service import ReportService
from mrg.text.states import manual_states

__all__ = [
    "Comparison",
    "LabelRow",
    "Manual",
    "ReportService",
    "ReportUpdate",
    "ServiceInfo",
    "StudyFindings",
    "StudyRefused",
    "manual_states",
    "report_sentences",
]
