"""The findings panel: the findings head's reading of the study, the Grad-CAM of one of its
findings, the what-if, and whether the report and the findings it was written from agree.

Reading: the 14 ChestX-ray14 findings, most probable first, each with its calibrated
probability and its state (present, possible, absent, or not stated: what a states model
writes the report from). It is read once a study is loaded (after the study is shown).
Clicking a finding puts the Grad-CAM of the head's logit for that finding on the viewer's
images (CheXNet's picture), as the report's Grad-CAM is shown.

What-if: with "Set findings by hand", Generate writes from the states chosen ("Effusion" is
present, "Effusion: possible", "Effusion: absent") instead of the head's
(``ReportService.stream(…, findings={…})``); a model that writes from the image alone says it
cannot. A new study starts from the head's reading again.

Consistency: once a report is finished, the states the labeler reads in it are compared with
those it was written from (a model before the states: the findings it names); for a report
written despite the gate, the line first says that reading is of an image the head was not
made for (the panel shows none for a refused study).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import gradio as gr

from mrg.text.states import (
    POSSIBLE,
    PRESENT,
    STATES,
    manual_states,
    states_from_statuses,
    with_state,
)
from mrg.text.taxonomy import FINDINGS14, display_name, finding_named
from mrg.ui.common import SLOTS, UNEXPECTED, DemoState, gpu, log_failure

if TYPE_CHECKING:
    from mrg.service import StudyFindings

# What reading a loaded study's findings updates, in this order.
READ = (
    "findings_head",
    "findings_note",
    "findings_check",
    "manual_findings",
    "manual_choice",
    "state",
)
# What clicking a finding updates (the viewer, as ``explanation.EXPLAINED`` does, and its toggle).
FINDING_SHOWN = ("frontal_view", "lateral_view", "explain_status", "show_cam", "state")
FINDING_INPUTS = ("state", "preset", "center", "width", "invert", "opacity")
NOT_STATED = "not stated"
# the what-if's choices: a name alone is present, "Name: possible" / "Name: absent" the others
CHOICES = [
    display_name(f) if s == PRESENT else f"{display_name(f)}: {s}"
    for f in FINDINGS14
    for s in STATES
]
BEFORE = "Load a study: the findings head's reading appears here."
NO_HEAD = (
    "**No findings head is loaded** (no `findings/` folder beside the checkpoints): "
    "no probabilities to show. Findings can still be set by hand for a model that takes them."
)
# the panel shows no reading of a refused study; a report written anyway still had findings
DESPITE_GATE = (
    "Written despite the gate: the findings head read an image it was not made for, and its "
    "reading (in the report's header) is not shown above."
)


def finding_label(finding: str, state: str | None) -> str:
    """``Effusion · possible``: the row's name in the panel, with the finding's state."""
    return f"{display_name(finding)} · {state or NOT_STATED}"


def label_finding(label: str) -> str:
    """The ChestX-ray14 finding a row of the panel names (``finding_label`` read back)."""
    return finding_named(label.split(" · ")[0])


def chosen_states(chosen: Sequence[str]) -> dict[str, str]:
    """The what-if's choices (``CHOICES``) as states; a finding chosen twice keeps its last."""
    states = {}
    for choice in chosen:
        name, _, state = choice.partition(": ")
        states[name] = state or PRESENT
    return manual_states(states)


def state_choices(states: dict[str, str]) -> list[str]:
    """``chosen_states`` read back: the what-if's choices of ``states``."""
    return [c for c in CHOICES if chosen_states([c]).items() <= states.items()]


def stated(states: dict[str, str]) -> str:
    """``present: Cardiomegaly; possible: Effusion and Mass; absent: Pneumothorax``."""
    parts = [f"{s}: {listed(with_state(states, s))}" for s in STATES if with_state(states, s)]
    return "; ".join(parts) or "nothing stated (a normal study)"


def state_consistency(read: dict[str, str], given: dict[str, str], manual: bool) -> str:
    """Whether the states the labeler reads in a report (``read``) are those it was written
    from (``given``): each finding given a state must be read back in it, and no finding
    read present or possible that was not given so."""
    wrong = [
        f
        for f in FINDINGS14
        if (f in given and read.get(f) != given[f])
        or (f not in given and read.get(f) in (PRESENT, POSSIBLE))
    ]
    source = "set by hand" if manual else "the findings head's"
    if not wrong:
        return f"✓ **Report and states agree** ({source}: {stated(given)})."
    said = "; ".join(
        f"{display_name(f)} {given.get(f, NOT_STATED)}, the report: {read.get(f, NOT_STATED)}"
        for f in wrong
    )
    return f"⚠️ **Report and states disagree** ({source}): {said}."


def listed(names: Sequence[str]) -> str:
    """``A``, ``A and B``, ``A, B and C`` (display names)."""
    shown = [display_name(n) for n in names]
    return shown[0] if len(shown) == 1 else ", ".join(shown[:-1]) + " and " + shown[-1]


def consistency(in_report: Sequence[str], named: Sequence[str], manual: bool) -> str:
    """Whether the findings the labeler reads in a report (``in_report``) are those it was
    written from (``named``: the head's above their operating points, or set by hand)."""
    extra = [f for f in FINDINGS14 if f in in_report and f not in named]
    missing = [f for f in FINDINGS14 if f in named and f not in in_report]
    if not extra and not missing:
        both = f"both name {listed(named)}" if named else "neither names a finding"
        return f"✓ **Report and findings agree** ({both})."
    parts = []
    if extra:
        one = len(extra) == 1
        if manual:
            parts.append(
                f"the report names {listed(extra)}, which {'was' if one else 'were'} "
                "not set by hand"
            )
        else:
            points = "its operating point" if one else "their operating points"
            parts.append(
                f"the report names {listed(extra)}, which the findings head does not "
                f"find above {points}"
            )
    if missing:
        one = len(missing) == 1
        if manual:
            parts.append(
                f"{listed(missing)} {'was' if one else 'were'} set by hand, but the "
                f"report does not name {'it' if one else 'them'}"
            )
        else:
            parts.append(f"the head finds {listed(missing)}, which the report does not name")
    text = "; ".join(parts)
    return f"⚠️ **Report and findings disagree:** {text[0].upper()}{text[1:]}."


def reading_note(reading: StudyFindings) -> str:
    """The line under the panel: the states the report is written from."""
    return (
        f"Calibrated probabilities; the report states **{stated(reading.states)}**. "
        "Click a finding for its Grad-CAM in the viewer."
    )


class FindingsPanel:
    """Handlers of the findings panel; ``DemoApp`` mixes the panels together."""

    # ------------------------------------------------------------------ reading

    @gpu
    def read_study(self, state: DemoState):
        """The ``READ`` outputs: the head's reading of the study just loaded (the what-if
        starts again from it). Nothing changes where the study is the one already read."""
        keep = (gr.update(),) * (len(READ) - 1)
        if state.study is None:
            return gr.update(visible=False, value=None), BEFORE, "", *keep[3:], state
        if state.reading_key == state.case_key:  # e.g. a load that failed: the same study
            return *keep, state
        try:
            state.screening, reading = self.service.screen_and_read(state.study)
            if state.screening.refused:  # no reading of what is not a chest radiograph
                state.reading, state.reading_key = None, state.case_key
                note = f"**Not a chest radiograph: its findings are not shown.** {state.screening.message}"
                return gr.update(visible=False, value=None), note, "", *keep[3:], state
        except Exception as err:  # noqa: BLE001
            log_failure("reading the findings", err)
            note = f"**Cannot read the findings.** {UNEXPECTED}"
            return gr.update(visible=False, value=None), note, "", *keep[3:], state
        state.reading, state.reading_key = reading, state.case_key
        what_if = (False, gr.update(value=[], visible=False))
        if reading is None:
            return gr.update(visible=False, value=None), NO_HEAD, "", *what_if, state
        value = {finding_label(f, reading.states.get(f)): p for f, p, _ in reading.ranked()}
        what_if = (False, gr.update(value=state_choices(reading.states), visible=False))
        return gr.update(visible=True, value=value), reading_note(reading), "", *what_if, state

    # ------------------------------------------------------------------ Grad-CAM of a finding

    @gpu
    def select_finding(
        self,
        state: DemoState,
        preset: str,
        center: float,
        width: float,
        invert: bool,
        opacity: float,
        evt: gr.SelectData,
    ):
        """A click on a row of the panel: ``show_finding`` of the finding it names."""
        return self.show_finding(state, str(evt.value), preset, center, width, invert, opacity)

    def show_finding(
        self,
        state: DemoState,
        label: str,
        preset: str,
        center: float,
        width: float,
        invert: bool,
        opacity: float,
    ):
        """The ``FINDING_SHOWN`` outputs: the Grad-CAM of the head's logit for the finding
        ``label`` names, on the viewer's images, the overlay toggle on."""

        def failed(status: str):
            return gr.update(), gr.update(), status, gr.update(), state

        if state.study is None:
            return failed("**Load a study first.**")
        try:
            finding = label_finding(label)
            state.heatmaps = self.service.explain_finding(state.study, finding)
        except ValueError as err:
            return failed(f"**Cannot explain:** {err}")
        except Exception as err:  # noqa: BLE001
            log_failure("Grad-CAM of a finding", err)
            return failed(f"**Cannot explain.** {UNEXPECTED}")
        views = self.render(state, preset, center, width, invert, True, opacity)
        reading = state.reading
        odds = ""
        if reading is not None and finding in reading.probabilities:
            p, state = reading.probabilities[finding], reading.states.get(finding, NOT_STATED)
            odds = f" (p {p:.0%}, {state})"
        status = (
            f"Grad-CAM of the findings head's {display_name(finding)}{odds}: "
            "slide the viewer's divider to compare."
        )
        return *views, status, True, state

    # ------------------------------------------------------------------ what-if

    def findings_to_write_from(self, state: DemoState, manual: bool, chosen: list[str] | None):
        """What ``generate`` hands ``ReportService.stream`` as ``findings``: the states set by
        hand, else the reading already made of this study (None: the service reads it)."""
        if manual:
            return chosen_states(chosen or [])
        return state.reading if state.reading_key == state.case_key else None

    def written_from(self, mode: str, condition: StudyFindings | None) -> str:
        """The report header's note on what ``mode`` wrote from ("" for none)."""
        if condition is None:
            return ""
        config = self.service.model(mode).config
        if config.uses_states:
            kind, what = "states", stated(condition.states)
        else:
            kind = "findings"
            what = listed(condition.named) if condition.named else "none (a normal study)"
        if condition.manual:
            return f" · written from {kind} set by hand: {what}"
        if config.uses_findings:
            return f" · written from the findings head's reading: {what}"
        return ""

    # ------------------------------------------------------------------ consistency

    def check_findings(self, state: DemoState) -> str:
        """Per finished report, whether it names the findings it was written from."""
        lines = []
        for slot in range(len(state.shown)):
            mode, text = state.report(slot)
            condition = state.conditions.get(mode)
            if not text or condition is None:
                continue
            if self.service.model(mode).config.uses_states:
                read = states_from_statuses(self.service.labeler.statuses14(text))
                line = state_consistency(read, condition.states, condition.manual)
            else:
                said = self.service.labeler.label14(text)
                in_report = [f for f in FINDINGS14 if said.get(f)]
                line = consistency(in_report, condition.named, condition.manual)
            if state.screening is not None and state.screening.allowed_anyway:
                line = f"{DESPITE_GATE} {line}"
            if len(state.shown) > 1:
                line = f"{SLOTS[slot] if state.blinding else mode}: {line}"
            lines.append(line)
        return "\n\n".join(lines)

    # ------------------------------------------------------------------ layout

    def _build_findings(self, c: dict) -> None:
        c["findings_head"] = gr.Label(
            num_top_classes=len(FINDINGS14),
            show_heading=False,
            label="Findings head (click: Grad-CAM)",
            elem_id="findings-head",
            visible=False,
        )
        c["findings_note"] = gr.Markdown(BEFORE, elem_id="findings-note")
        c["findings_check"] = gr.Markdown(elem_id="findings-check")
        c["manual_findings"] = gr.Checkbox(
            label="Set findings by hand (what-if)", value=False, elem_id="manual-findings"
        )
        c["manual_choice"] = gr.Dropdown(
            CHOICES,
            multiselect=True,
            label="Write the report from (a name: present; none: a normal study)",
            visible=False,
            elem_id="manual-choice",
        )

    def _wire_findings(self, c: dict, loads: list, generation) -> None:
        read = [c[name] for name in READ]
        for event in loads:
            event.then(self.read_study, [c["state"]], read, api_name=False)
        c["findings_head"].select(
            self.select_finding,
            [c[name] for name in FINDING_INPUTS],
            [c[name] for name in FINDING_SHOWN],
            api_name=False,
        )
        c["manual_findings"].input(
            lambda manual: gr.update(visible=bool(manual)),
            [c["manual_findings"]],
            [c["manual_choice"]],
            api_name=False,
        )
        generation.then(self.check_findings, [c["state"]], [c["findings_check"]], api_name=False)
