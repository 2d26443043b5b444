"""The explanation panel's handler: Grad-CAM of Report A, or of one of its sentences, shown
on the viewer's own images (the viewer's "Grad-CAM overlay" toggle and opacity). A report is
scored under the findings it was written from. The findings panel puts the Grad-CAM of one
finding of the findings head on the same overlay (``mrg.ui.findings``)."""

from __future__ import annotations

import gradio as gr

from mrg.ui.common import UNEXPECTED, WHOLE_REPORT, DemoState, gpu, log_failure

EXPLAINED = ("frontal_view", "lateral_view", "explain_status", "state")
EXPLAIN_INPUTS = (
    "state",
    "show_cam",
    "sentence",
    "preset",
    "center",
    "width",
    "invert",
    "opacity",
)


class ExplanationPanel:
    """Handlers of the explanation; ``DemoApp`` mixes the panels together."""

    @gpu
    def explain(
        self,
        state: DemoState,
        show_cam: bool,
        sentence: str | None,
        preset: str,
        center: float,
        width: float,
        invert: bool,
        opacity: float,
    ):
        """The ``EXPLAINED`` outputs: heatmaps computed (when the toggle is on) and shown."""

        def shown(status: str):
            views = self.render(state, preset, center, width, invert, show_cam, opacity)
            return *views, status, state

        if not show_cam:
            return shown("")
        mode, report = state.report(0)
        if state.study is None or not report:
            return shown("**Generate a report first**, then turn on the Grad-CAM overlay.")
        chosen = None if sentence in (None, "", WHOLE_REPORT) else sentence
        try:
            state.heatmaps = self.service.explain(
                state.study, mode, report, chosen, findings=state.conditions.get(mode)
            )
        except ValueError as err:
            state.heatmaps = []
            return shown(f"**Cannot explain:** {err}")
        except Exception as err:  # noqa: BLE001
            log_failure("Grad-CAM", err)
            state.heatmaps = []
            return shown(f"**Cannot explain.** {UNEXPECTED}")
        target = f"sentence “{chosen}”" if chosen else "the whole of Report A"
        return shown(f"Grad-CAM of {target}: slide the viewer's divider to compare.")

    def refresh(self, state: DemoState, show_cam: bool, *view):
        """After a new report: its Grad-CAM where the overlay is on; else nothing changes."""
        if not show_cam:
            return gr.update(), gr.update(), "", state
        return self.explain(state, show_cam, *view)

    def _wire_explanation(self, c: dict, generation) -> None:
        inputs = [c[name] for name in EXPLAIN_INPUTS]
        outputs = [c[name] for name in EXPLAINED]
        c["show_cam"].input(self.explain, inputs, outputs, api_name="explain")
        c["sentence"].input(self.explain, inputs, outputs, api_name=False)
        generation.then(self.refresh, inputs, outputs, api_name=False, show_progress="hidden")
