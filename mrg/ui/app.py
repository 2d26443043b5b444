"""The page: one reading row (viewer | findings head | report | reference), the review below it.

``DemoApp`` mixes the panels' handlers (``viewer``, ``findings``, ``generation``,
``explanation``, ``comparison``, ``review``); each panel builds its own components into one
dict ``c`` (name → component) and wires its own events, so a handler is found in the file
where its panel is built. Handlers return plain values (or yield them, for streaming) so they can be
tested without a browser; every user-facing failure becomes a message in the page.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import gradio as gr

from mrg.config import CUSTOMIZED_MODES
from mrg.imaging import DEFAULT_LIMITS, ImageLimits
from mrg.loading import Loading
from mrg.review import ReviewStore
from mrg.ui.common import (
    COMPARE_BOTH,
    LOADING_BANNER,
    DemoState,
    Example,
    banner,
    failed_banner,
)
from mrg.ui.comparison import ComparisonPanel
from mrg.ui.explanation import ExplanationPanel
from mrg.ui.findings import FindingsPanel
from mrg.ui.generation import GenerationPanel
from mrg.ui.review import ReviewPanel
from mrg.ui.viewer import LOADED, ViewerPanel
from mrg.uploads import UploadReader

if TYPE_CHECKING:  # torch and the models load after the page is up (``mrg.loading``)
    from mrg.data.datasets import StudyRecord
    from mrg.service import ReportService

# The reading row fits 1440×900: compact blocks, the report boxes and reference side by side.
CSS = """
.gradio-container {max-width: 100% !important; padding-top: 4px !important}
#banner p {margin: 2px 0} #banner h2 {margin: 0 0 2px 0; font-size: 1.15em}
#reading-row {gap: 10px}
#reference-view, #generated-view {max-height: 190px; overflow-y: auto; font-size: 0.92em}
#compare-table {max-height: 180px; overflow-y: auto; font-size: 0.85em}
#compare-table table {width: 100%}
#compare-table th, #compare-table td {overflow-wrap: break-word; padding: 3px 5px}
mark.agree-matched, mark.agree-missed, mark.agree-hallucinated {padding: 0 1px; color: inherit}
#findings-head {padding: 6px 8px !important}
#findings-head .confidence-set {margin-bottom: 2px; font-family: inherit; font-size: 0.8em;
  cursor: pointer}
#findings-head .bar {margin-bottom: 1px}
#findings-head .text {line-height: 1.25}
#findings-head .line {display: none}
#manual-choice label {padding: 1px 6px !important; font-size: 0.8em}
#findings-note p, #findings-check p {margin: 2px 0; font-size: 0.86em}
#level .min_value, #level .max_value, #window .min_value, #window .max_value {flex: none;
  white-space: nowrap}
#level input[type=range], #window input[type=range] {min-width: 0; flex: 1 1 0}
"""


class DemoApp(
    ViewerPanel, FindingsPanel, GenerationPanel, ExplanationPanel, ComparisonPanel, ReviewPanel
):
    """The demo's handlers; ``build`` lays them out as Gradio Blocks.

    ``service`` may still be loading (``mrg.loading.Loading``): the page is built from
    ``modes`` (what the checkpoint folder holds) and says so in the banner until the models
    are ready; a handler that needs them waits for them.
    """

    def __init__(
        self,
        service: ReportService | Loading[ReportService],
        store: ReviewStore,
        examples: list[Example] | None = None,
        dataset: list[StudyRecord] | None = None,
        limits: ImageLimits = DEFAULT_LIMITS,
        uploads: UploadReader | None = None,
        modes: Sequence[str] = CUSTOMIZED_MODES,
    ):
        self.loading = service if isinstance(service, Loading) else Loading.of(service)
        self.store, self.limits = store, limits
        self.modes = list(self.loading.get().info.modes if self.loading.succeeded() else modes)
        self.uploads = uploads or UploadReader()
        self.examples = {e.label: e for e in (examples or [])}
        self.dataset = {r.study_id: r for r in (dataset or [])}

    @property
    def service(self) -> ReportService:
        """The loaded service (waits while the models load)."""
        return self.loading.get()

    def banner_text(self, blinded: bool = False) -> str:
        if not self.loading.ready():
            return LOADING_BANNER
        if self.loading.error:
            return failed_banner(self.loading.error)
        return banner(self.loading.get().info, blinded)

    def banner_now(self, blinded: bool = False):
        """(banner, timer update): the loaded banner once ready, and the timer stopped."""
        if not self.loading.ready():
            return gr.update(), gr.update()
        return self.banner_text(blinded), gr.Timer(active=False)

    def set_blinded(self, blinded: bool, session: str):
        """(banner, mode choice, reviews): a blinded page names no mode anywhere."""
        return (
            self.banner_text(blinded),
            gr.update(visible=not blinded),
            self.review_rows(session),
        )

    def build(self) -> gr.Blocks:
        modes = [m for m in (*CUSTOMIZED_MODES, "static") if m in self.modes]
        if set(CUSTOMIZED_MODES) <= set(self.modes):
            modes.append(COMPARE_BOTH)
        c: dict = {}
        # delete_cache: Gradio's own copies (images shown, exports) go after 10 minutes
        with gr.Blocks(
            title="mrg — chest X-ray report generation (research demo)",
            delete_cache=(600, 600),
            fill_width=True,
        ) as demo:
            c["state"] = gr.State(DemoState())
            c["banner"] = gr.Markdown(self.banner_text(), elem_id="banner")
            until_loaded = gr.Timer(1.0, active=not self.loading.ready())
            self._build_study_row(c)
            with gr.Row(elem_id="reading-row"):
                with gr.Column(scale=11, min_width=420):
                    self._build_viewer(c)
                with gr.Column(scale=4, min_width=220):
                    self._build_findings(c)
                with gr.Column(scale=7, min_width=290):
                    self._build_generation(c, modes)
                with gr.Column(scale=7, min_width=290):
                    self._build_comparison(c)
            self._build_queue(c)
            self._build_review(c)
            self._build_decoding(c)
            self._build_report_api(c)

            until_loaded.tick(
                self.banner_now, [c["blinded"]], [c["banner"], until_loaded], api_name=False
            )
            loaded = [c[name] for name in LOADED]
            loads = self._wire_viewer(c)
            generation = self._wire_generation(c)
            self._wire_explanation(c, generation)
            self._wire_comparison(c, generation)
            loads += self._wire_review(c, loaded, generation)
            self._wire_findings(c, loads, generation)
            c["blinded"].change(
                self.set_blinded,
                [c["blinded"], c["session"]],
                [c["banner"], c["mode"], c["reviews"]],
                api_name=False,
            )
        return demo
