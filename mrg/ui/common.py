"""What every panel of the page shares: the session state, the examples, the banner, and how
an unexpected failure becomes a message.

Only Gradio and light modules are imported here: torch and the models load after the page
is up (``mrg.loading``).
"""

from __future__ import annotations

import json
import logging
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mrg.data.datasets import StudyRecord
    from mrg.data.study import Study
    from mrg.model.gate import Screening
    from mrg.review import Blinding
    from mrg.service import ServiceInfo, StudyFindings

log = logging.getLogger("mrg.ui")
COMPARE_BOTH = "compare both"
WHOLE_REPORT = "(whole report)"
SLOTS = ("Report A", "Report B")
# Report requests Gradio hands to the service at once: the service's batch (8) and waiting
# room (8); past them it answers "busy" (``mrg.batching.ServiceBusy``).
REPORTS_AT_ONCE = 16
UNEXPECTED = "Something went wrong on the server (the error was logged). Please try again."
SHIPPED_EXAMPLES = Path(__file__).resolve().parents[2] / "assets" / "examples"

try:  # ZeroGPU on Hugging Face Spaces: run GPU work inside spaces.GPU; elsewhere a no-op
    import spaces

    gpu = spaces.GPU
except ImportError:

    def gpu(function):
        return function


def log_failure(action: str, err: BaseException) -> None:
    """Log an unexpected failure's type and stack, never its message: a message may quote a
    DICOM attribute or an uploaded file's name (patient identifiers)."""
    frames = "".join(traceback.format_tb(err.__traceback__))
    log.error("%s failed with %s\n%s", action, type(err).__name__, frames)


@dataclass
class Example:
    label: str
    frontal: Path
    lateral: Path | None = None
    reference: str = ""


def session_name(session: str | None) -> str:
    """The review session a text field names: stripped, ``default`` when empty."""
    return (session or "").strip() or "default"


def example_key(label: str) -> str:
    return f"example:{label}"


def dataset_key(record: StudyRecord) -> str:
    """A dataset case's key: its split and id, nothing from the image."""
    return f"dataset:{record.split}:{record.study_id}"


@dataclass
class DemoState:
    """Per-browser-session state.

    ``shown``: the modes whose reports fill Report A and Report B, in that order (one or
    two); ``blinding`` is set where a blinded session chose that order. ``generated``: the
    text each mode wrote for ``study``. ``position``: where the review queue stands.
    ``reading``: the findings head's reading of ``study`` (``StudyFindings``; None without a
    head), read for ``reading_key``; ``conditions``: per mode, the findings its report was
    written from (the head's reading, or findings set by hand). ``screening``: the
    chest-radiograph gate's verdict on ``study`` (``mrg.model.gate.Screening``).
    """

    study: Study | None = None
    case_key: str = ""
    generated: dict[str, str] = field(default_factory=dict)
    reading: StudyFindings | None = None
    reading_key: str = ""
    conditions: dict[str, StudyFindings | None] = field(default_factory=dict)
    screening: Screening | None = None
    shown: list[str] = field(default_factory=list)
    blinding: Blinding | None = None
    heatmaps: list = field(default_factory=list)
    position: int | None = None

    def report(self, slot: int) -> tuple[str, str]:
        """``(mode, text)`` of Report A (0) or B (1); empty where nothing is shown there."""
        if slot >= len(self.shown):
            return "", ""
        mode = self.shown[slot]
        return mode, self.generated.get(mode, "")


def shipped_examples(folder: Path = SHIPPED_EXAMPLES) -> list[Example]:
    """The NIH ChestX-ray14 radiographs in ``folder`` (its ``manifest.json``), NIH's labels
    (mined from the original reports; no report text is public) as the reference findings."""
    manifest = folder / "manifest.json"
    if not manifest.is_file():
        return []
    examples = []
    for entry in json.loads(manifest.read_text())["examples"]:
        findings = ", ".join(entry["nih_labels"]) or "No Finding"
        examples.append(
            Example(
                f"NIH ChestX-ray14 {entry['view_position']}: {findings}",
                folder / entry["file"],
                reference=f"NIH ChestX-ray14 labels: {findings}.",
            )
        )
    return examples


def default_examples(shared_data: Path | None = None) -> list[Example]:
    """Offline examples: the real chest DICOM from ``pydicom-data``, the NIH radiographs that
    ship in ``assets/examples``, and IU X-ray studies when the shared data is present."""
    from pydicom.data import get_testdata_file

    examples = [
        Example(
            "Chest CR, DICOM, MONOCHROME1 (pydicom-data RG1_UNCI)",
            Path(get_testdata_file("RG1_UNCI.dcm")),
        ),
        *shipped_examples(),
    ]
    if shared_data is not None:
        annotation = shared_data / "iu_xray" / "annotation_sample.json"
        if annotation.is_file():
            for entry in json.loads(annotation.read_text())["test"]:
                paths = [shared_data / "iu_xray" / "images" / p for p in entry["image_path"]]
                examples.append(
                    Example(
                        f"IU X-ray {entry['id']} (frontal + lateral)",
                        paths[0],
                        paths[1],
                        entry["report"],
                    )
                )
    return examples


TITLE = "## mrg — chest X-ray report generation with customized prompts\n"


def banner(info: ServiceInfo, blinded: bool = False) -> str:
    """The banner: research use, what is loaded and where, and what the checkpoints cannot do.
    A blinded session names no mode."""
    modes = "blinded A/B session" if blinded else ", ".join(info.modes)
    text = (
        TITLE + "**Research demo, not for diagnosis.** "
        f"Modes: {modes} · LLM: {info.llm}"
        + (f" ({info.quantization})" if info.quantization != "none" else "")
        + f" · device: {info.device}, {info.dtype}."
    )
    if info.views == 1:
        text += " The checkpoints read the frontal view only; a lateral is shown but not used."
    if not info.trained:
        text += " ⚠️ **No trained checkpoint found: reports come from untrained weights.**"
    return text


LOADING_BANNER = (
    TITLE + "**Research demo, not for diagnosis.** **Loading the models…** You can load a "
    "study now; generating waits until they are ready."
)


def failed_banner(error: BaseException) -> str:
    return (
        TITLE
        + f"⚠️ **The models could not be loaded ({type(error).__name__}); see the server log.**"
    )
