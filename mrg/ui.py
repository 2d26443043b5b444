"""The Gradio Blocks demo: layout and thin handlers over ``ReportService`` and ``ReviewStore``.

Handlers return plain values (or yield them, for streaming) so they can be tested without a
browser; every user-facing failure becomes a message in the page, never an exception that
takes the app down.
"""

from __future__ import annotations

import hashlib
import html
import logging
import tempfile
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import gradio as gr

from mrg.config import CUSTOMIZED_MODES, DEFAULT_DECODING, Decoding
from mrg.imaging import DEFAULT_LIMITS, ImageError, ImageLimits
from mrg.loading import Loading
from mrg.review import ERROR_CATEGORIES, VERDICTS, Review, ReviewError, ReviewStore
from mrg.uploads import UploadReader

if TYPE_CHECKING:  # torch and the models load after the page is up (``mrg.loading``)
    from mrg.data.datasets import StudyRecord
    from mrg.data.study import Study
    from mrg.service import ReportService, ServiceInfo

log = logging.getLogger(__name__)
COMPARE_BOTH = "compare both"
WHOLE_REPORT = "(whole report)"
AGREEMENT_COLOURS = {"matched": "#1b7f3b", "missed": "#b26a00", "hallucinated": "#b00020"}
# Report requests Gradio hands to the service at once: the service's batch (8) and waiting
# room (8); past them it answers "busy" (``mrg.batching.ServiceBusy``).
REPORTS_AT_ONCE = 16
UNEXPECTED = "Something went wrong on the server (the error was logged). Please try again."

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


@dataclass
class DemoState:
    """Per-browser-session state."""

    study: Study | None = None
    case_key: str = ""
    generated: dict[str, str] = field(default_factory=dict)
    heatmaps: list = field(default_factory=list)


SHIPPED_EXAMPLES = Path(__file__).resolve().parents[1] / "assets" / "examples"


def shipped_examples(folder: Path = SHIPPED_EXAMPLES) -> list[Example]:
    """The NIH ChestX-ray14 radiographs in ``folder`` (its ``manifest.json``), NIH's labels
    (mined from the original reports; no report text is public) as the reference findings."""
    import json

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
        import json

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


def banner(info: ServiceInfo) -> str:
    """The banner: research use, what is loaded and where, and what the checkpoints cannot do."""
    text = (
        "## mrg — chest X-ray report generation with customized prompts\n"
        "**Research demo, not for diagnosis.** "
        f"Modes: {', '.join(info.modes)} · LLM: {info.llm}"
        + (f" ({info.quantization})" if info.quantization != "none" else "")
        + f" · device: {info.device}, {info.dtype}."
    )
    if info.views == 1:
        text += " The checkpoints read the frontal view only; a lateral is shown but not used."
    if not info.trained:
        text += " ⚠️ **No trained checkpoint found: reports come from untrained weights.**"
    return text


LOADING_BANNER = (
    "## mrg — chest X-ray report generation with customized prompts\n"
    "**Research demo, not for diagnosis.** **Loading the models…** You can load a study "
    "now; generating waits until they are ready."
)


def failed_banner(error: BaseException) -> str:
    return (
        "## mrg — chest X-ray report generation with customized prompts\n"
        f"⚠️ **The models could not be loaded ({type(error).__name__}); see the server log.**"
    )


class DemoApp:
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

    def banner_now(self):
        """(banner, timer update): the loaded banner once ready, and the timer stopped."""
        if not self.loading.ready():
            return gr.update(), gr.update()
        text = (
            failed_banner(self.loading.error)
            if self.loading.error
            else banner(self.loading.get().info)
        )
        return text, gr.Timer(active=False)

    # ------------------------------------------------------------------ loading

    def _study_from(self, sources: list[Path | bytes], key: str) -> Study:
        """Frontal (and lateral) from the first two sources; DICOM view positions win over the order."""
        from mrg.data.study import study_from_sources

        lateral = sources[1] if len(sources) > 1 else None
        return study_from_sources(sources[0], lateral, study_id=key, limits=self.limits)

    def _loaded(self, state: DemoState, study: Study, key: str, reference: str, message: str):
        state.study, state.case_key, state.generated, state.heatmaps = study, key, {}, []
        frontal = study.views[0].image.to_uint8()
        lateral = study.views[1].image.to_uint8() if len(study.views) > 1 else None
        return state, reference, frontal, lateral, self._meta_markdown(study), message

    def _failed(self, state: DemoState, message: str):
        return state, gr.update(), None, None, "", f"**Could not load the study.** {message}"

    def _read_uploads(self, frontal: str, lateral: str | None) -> tuple[list[bytes], str]:
        """The uploaded files' bytes (the files themselves are gone after this) and a content key."""
        data = [self.uploads.read(p) for p in (frontal, lateral) if p]
        return data, "sha256:" + hashlib.sha256(b"".join(data)).hexdigest()[:20]

    def _load(self, state: DemoState, read, reference: str, message: str):
        """Load a study from ``read() → (sources, key)``; any failure leaves ``state`` as it was."""
        try:
            sources, key = read()
            study = self._study_from(sources, key)
        except ImageError as err:
            return self._failed(state, str(err))
        except Exception as err:  # noqa: BLE001 — the user gets a message, the log the stack
            log_failure("loading a study", err)
            return self._failed(state, UNEXPECTED)
        return self._loaded(state, study, key, reference, self._warnings(study) or message)

    def load_upload(self, state: DemoState, frontal: str | None, lateral: str | None):
        if not frontal:
            return self._failed(state, "Please upload a frontal chest X-ray (PNG, JPEG or DICOM).")
        return self._load(
            state, lambda: self._read_uploads(frontal, lateral), "", "Study loaded from upload."
        )

    def load_example(self, state: DemoState, label: str | None):
        example = self.examples.get(label or "")
        if example is None:
            return self._failed(state, "Choose an example.")
        sources = [example.frontal] + ([example.lateral] if example.lateral else [])
        return self._load(
            state, lambda: (sources, f"example:{label}"), example.reference, "Example loaded."
        )

    def load_case(self, state: DemoState, choice: str | None):
        record = self.dataset.get((choice or "").split(" ")[0])
        if record is None:
            return self._failed(state, "Choose a case from the dataset.")
        key = f"dataset:{record.split}:{record.study_id}"
        return self._load(
            state,
            lambda: (record.image_paths, key),
            record.report,
            f"Case {record.study_id} loaded.",
        )

    def case_choices(self, session: str = "") -> list[str]:
        reviewed = self.store.reviewed_keys(session or None)
        return [
            f"{r.study_id} ✓ reviewed"
            if f"dataset:{r.split}:{r.study_id}" in reviewed
            else r.study_id
            for r in self.dataset.values()
        ]

    @staticmethod
    def _warnings(study: Study) -> str:
        notes = [w for v in study.views for w in v.image.meta.warnings]
        return "⚠️ " + " ".join(notes) if notes else ""

    @staticmethod
    def _meta_markdown(study: Study) -> str:
        lines = [
            "| view | format | modality | size | pixel spacing | display |",
            "|---|---|---|---|---|---|",
        ]
        for view in study.views:
            m = view.image.meta
            spacing = (
                f"{m.pixel_spacing_mm[0]:.3f} × {m.pixel_spacing_mm[1]:.3f} mm"
                if m.pixel_spacing_mm
                else "—"
            )
            lines.append(
                f"| {view.position} | {m.format} | {m.modality or '—'} | {m.width}×{m.height} | {spacing} "
                f"| {m.windowing or '—'} |"
            )
        return "\n".join(lines)

    # ------------------------------------------------------------------ generation

    def _modes(self, choice: str) -> list[str]:
        if choice == COMPARE_BOTH:
            return [m for m in CUSTOMIZED_MODES if m in self.modes]
        return [choice]

    @gpu
    def generate(
        self,
        state: DemoState,
        mode: str,
        strategy: str,
        max_tokens: float,
        penalty: float,
        temperature: float,
        top_p: float,
    ):
        """Stream (findings A, impression A, findings B, impression B, stats, sentence choices, state)."""
        if state.study is None:
            yield "", "", "", "", "**Load a study first.**", gr.update(), state
            return
        try:
            decoding = Decoding(
                strategy=strategy,
                max_new_tokens=int(max_tokens),
                repetition_penalty=float(penalty),
                temperature=float(temperature),
                top_p=float(top_p),
            ).validate()
        except ValueError as err:
            yield "", "", "", "", f"**Invalid decoding settings:** {err}", gr.update(), state
            return
        boxes = ["", "", "", ""]
        stats = []
        state.generated = {}
        for slot, current in enumerate(self._modes(mode)):
            update = None
            try:
                for update in self.service.stream(state.study, current, decoding):
                    boxes[2 * slot], boxes[2 * slot + 1] = update.findings, update.impression
                    yield (
                        *boxes,
                        f"Generating ({current})… {update.tokens} tokens",
                        gr.update(),
                        state,
                    )
            except Exception as err:  # noqa: BLE001 — a model failure must not take the app down
                from mrg.batching import ServiceBusy

                if isinstance(err, ServiceBusy):
                    yield *boxes, f"**{err}**", gr.update(), state
                    return
                log_failure("generation", err)
                yield (
                    *boxes,
                    "**The model failed on this study.** Please try again or load another study.",
                    gr.update(),
                    state,
                )
                return
            state.generated[current] = update.text if update else ""
            if update is not None:
                rate = f"{update.tokens_per_s:.1f} tokens/s" if update.tokens_per_s else "—"
                ttft = f"{update.ttft_s:.2f} s" if update.ttft_s is not None else "—"
                stats.append(
                    f"**{current}**: {update.tokens} tokens, first token after {ttft}, {rate}"
                )
        from mrg.service import report_sentences

        first = next(iter(state.generated.values()), "")
        choices = [WHOLE_REPORT] + report_sentences(first)
        yield *boxes, " · ".join(stats), gr.update(choices=choices, value=WHOLE_REPORT), state

    # ------------------------------------------------------------------ stateless API

    @gpu
    def report(self, frontal: str | None, lateral: str | None, mode: str | None) -> dict:
        """One study in, its report out, with no session (``api_name="/report"``).

        Greedy decoding with the app's defaults. Unusable input raises ``gr.Error`` with the
        message the page would show, which ``gradio_client`` raises as ``AppError``.
        """
        mode = mode or CUSTOMIZED_MODES[0]
        if mode not in self.modes:
            raise gr.Error(f"mode must be one of {', '.join(self.modes)}, got {mode!r}")
        if not frontal:
            raise gr.Error("Give a frontal chest X-ray (PNG, JPEG or DICOM).")
        try:
            study = self._study_from(*self._read_uploads(frontal, lateral))
            update = self.service.generate(study, mode)
        except ImageError as err:
            raise gr.Error(f"Could not load the study. {err}") from None
        except Exception as err:  # noqa: BLE001
            from mrg.batching import ServiceBusy

            if isinstance(err, ServiceBusy):
                raise gr.Error(str(err)) from None
            log_failure("the report API", err)
            raise gr.Error(UNEXPECTED) from None
        return {
            "findings": update.findings,
            "impression": update.impression,
            "text": update.text,
            "mode": mode,
            "checkpoint": self.service.info.checkpoints.get(mode, "untrained"),
            "tokens": update.tokens,
            "views": [v.position for v in study.views],
        }

    # ------------------------------------------------------------------ explanation

    @gpu
    def explain(self, state: DemoState, mode: str, sentence: str | None, opacity: float):
        current = self._modes(mode)[0]
        report = state.generated.get(current, "")
        if state.study is None or not report:
            return None, None, "**Generate a report first.**", state
        chosen = None if sentence in (None, "", WHOLE_REPORT) else sentence
        try:
            state.heatmaps = self.service.explain(state.study, current, report, chosen)
        except ValueError as err:
            return None, None, f"**Cannot explain:** {err}", state
        except Exception as err:  # noqa: BLE001
            log_failure("Grad-CAM", err)
            return None, None, f"**Cannot explain.** {UNEXPECTED}", state
        frontal, lateral = self.blend(state, opacity)
        target = f"sentence “{chosen}”" if chosen else "the whole report"
        return frontal, lateral, f"Grad-CAM of {target} ({current}).", state

    @staticmethod
    def blend(state: DemoState, opacity: float):
        if state.study is None or not state.heatmaps:
            return None, None
        overlays = [
            h.overlay(v.image.pixels, float(opacity))
            for h, v in zip(state.heatmaps, state.study.views)
        ]
        return tuple((overlays + [None, None])[:2])

    # ------------------------------------------------------------------ comparison

    def compare(self, state: DemoState, mode: str, reference: str):
        current = self._modes(mode)[0]
        generated = state.generated.get(current, "")
        if not generated:
            return "**Generate a report first.**", ""
        if not (reference or "").strip():
            return "**Paste or load a reference report to compare with.**", ""
        try:
            result = self.service.compare(generated, reference)
        except Exception as err:  # noqa: BLE001
            log_failure("comparison", err)
            return f"**Cannot compare.** {UNEXPECTED}", ""
        metrics = " · ".join(f"{k.replace('_', '-')} {v:.3f}" for k, v in result.metrics.items())
        notes = (" " + " ".join(result.notes)) if result.notes else ""
        return f"**{current} vs reference:** {metrics}.{notes}", self.label_table(result.rows)

    @staticmethod
    def label_table(rows) -> str:
        if not rows:
            return "<p>No CheXpert finding is mentioned positively in either report.</p>"
        body = []
        for row in rows:
            colour = AGREEMENT_COLOURS[row.agreement]
            ref = "<br>".join(html.escape(s) for s in row.reference_sentences) or "—"
            gen = "<br>".join(html.escape(s) for s in row.generated_sentences) or "—"
            body.append(
                f"<tr><td>{html.escape(row.observation)}</td>"
                f"<td style='color:white;background:{colour};font-weight:600'>{row.agreement}</td>"
                f"<td>{ref}</td><td>{gen}</td></tr>"
            )
        return (
            "<table class='label-agreement'><thead><tr><th>finding</th><th>agreement</th>"
            "<th>reference sentences</th><th>generated sentences</th></tr></thead><tbody>"
            + "".join(body)
            + "</tbody></table>"
        )

    # ------------------------------------------------------------------ review

    def save_review(
        self,
        state: DemoState,
        mode: str,
        reference: str,
        verdict: str | None,
        categories: list[str] | None,
        note: str,
        reviewer: str,
        session: str,
    ):
        current = self._modes(mode)[0]
        review = Review(
            session=(session or "default").strip(),
            case_key=state.case_key,
            mode=current,
            reviewer=(reviewer or "").strip(),
            verdict=verdict or "",
            categories=list(categories or []),
            note=note or "",
            generated=state.generated.get(current, ""),
            reference=reference or "",
            checkpoint=self.service.info.checkpoints.get(current, "untrained"),
        )
        try:
            self.store.save(review)
        except ReviewError as err:
            return f"**Not saved:** {err}", self.review_rows(session), gr.update()
        except Exception as err:  # noqa: BLE001 — e.g. the review database is locked or full
            log_failure("saving a review", err)
            return f"**Not saved.** {UNEXPECTED}", self.review_rows(session), gr.update()
        return (
            f"Saved: {review.verdict} for {review.case_key} ({review.mode}) by {review.reviewer}.",
            self.review_rows(session),
            gr.update(choices=self.case_choices(session)),
        )

    def review_rows(self, session: str = "") -> list[list[str]]:
        return [
            [
                r.created_at,
                r.case_key,
                r.mode,
                r.reviewer,
                r.verdict,
                "; ".join(r.categories),
                r.note,
            ]
            for r in self.store.reviews((session or "").strip() or None)
        ]

    def export(self, session: str, fmt: str) -> str:
        directory = Path(tempfile.mkdtemp(prefix="mrg-reviews-"))
        name = f"reviews-{(session or 'all').strip() or 'all'}.{fmt}"
        method = self.store.export_csv if fmt == "csv" else self.store.export_json
        return str(method(directory / name, (session or "").strip() or None))

    # ------------------------------------------------------------------ layout

    def build(self) -> gr.Blocks:
        ready = self.loading.succeeded()
        modes = [m for m in (*CUSTOMIZED_MODES, "static") if m in self.modes]
        if set(CUSTOMIZED_MODES) <= set(self.modes):
            modes.append(COMPARE_BOTH)
        # delete_cache: Gradio's own copies (images shown, exports) go after 10 minutes
        with gr.Blocks(
            title="mrg — chest X-ray report generation (research demo)", delete_cache=(600, 600)
        ) as demo:
            state = gr.State(DemoState())
            heading = gr.Markdown(
                banner(self.service.info) if ready else LOADING_BANNER, elem_id="banner"
            )
            until_loaded = gr.Timer(1.0, active=not ready)
            until_loaded.tick(self.banner_now, None, [heading, until_loaded], api_name=False)
            with gr.Row():
                with gr.Column(scale=1):
                    with gr.Tab("Upload"):
                        frontal_file = gr.File(
                            label="Frontal view (PNG, JPEG or DICOM)",
                            type="filepath",
                            elem_id="frontal-upload",
                        )
                        lateral_file = gr.File(
                            label="Lateral view (optional)",
                            type="filepath",
                            elem_id="lateral-upload",
                        )
                        upload_button = gr.Button("Load uploaded study", elem_id="load-upload")
                    with gr.Tab("Examples"):
                        example = gr.Dropdown(
                            list(self.examples), label="Example", value=None, elem_id="example"
                        )
                    with gr.Tab("Dataset", visible=bool(self.dataset)):
                        case = gr.Dropdown(
                            self.case_choices(), label="Case (✓ = reviewed)", value=None
                        )
                with gr.Column(scale=2):
                    with gr.Row():
                        frontal_image = gr.Image(
                            label="Frontal",
                            type="numpy",
                            format="png",
                            interactive=False,
                            image_mode="L",
                        )
                        lateral_image = gr.Image(
                            label="Lateral",
                            type="numpy",
                            format="png",
                            interactive=False,
                            image_mode="L",
                        )
                    load_status = gr.Markdown(elem_id="load-status")
                    meta = gr.Markdown()
            with gr.Row():
                mode = gr.Radio(modes, value=modes[0], label="Prompt customization", elem_id="mode")
                generate_button = gr.Button(
                    "Generate report", variant="primary", elem_id="generate"
                )
                stop_button = gr.Button("Stop", variant="stop")
            with gr.Accordion("Advanced decoding", open=False):
                with gr.Row():
                    strategy = gr.Radio(
                        ["greedy", "beam", "sample"],
                        value="greedy",
                        label="Strategy (beam does not stream)",
                    )
                    max_tokens = gr.Slider(
                        16,  # both headers and a word in each section take 11 tokens
                        200,
                        value=DEFAULT_DECODING.max_new_tokens,
                        step=1,
                        label="Max new tokens",
                    )
                    penalty = gr.Slider(
                        1.0,
                        2.5,
                        value=DEFAULT_DECODING.repetition_penalty,
                        step=0.05,
                        label="Repetition penalty",
                    )
                    temperature = gr.Slider(
                        0.1, 1.5, value=0.7, step=0.05, label="Temperature (sampling)"
                    )
                    top_p = gr.Slider(0.1, 1.0, value=0.9, step=0.05, label="Top-p (sampling)")
            with gr.Row():
                with gr.Column():
                    findings_a = gr.Textbox(label="FINDINGS", lines=5, elem_id="findings")
                    impression_a = gr.Textbox(label="IMPRESSION", lines=2, elem_id="impression")
                with gr.Column(visible=COMPARE_BOTH in modes):
                    findings_b = gr.Textbox(
                        label="FINDINGS (promptbook-wise, in 'compare both')", lines=5
                    )
                    impression_b = gr.Textbox(label="IMPRESSION (promptbook-wise)", lines=2)
            stats = gr.Markdown(elem_id="stats")
            with gr.Accordion("Explain (Grad-CAM)", open=True):
                with gr.Row():
                    sentence = gr.Dropdown([WHOLE_REPORT], value=WHOLE_REPORT, label="Explain")
                    opacity = gr.Slider(0.0, 1.0, value=0.45, step=0.05, label="Overlay opacity")
                    explain_button = gr.Button("Explain", elem_id="explain")
                explain_status = gr.Markdown()
                with gr.Row():
                    overlay_frontal = gr.Image(
                        label="Grad-CAM frontal",
                        type="numpy",
                        format="png",
                        interactive=False,
                        elem_id="overlay-frontal",
                    )
                    overlay_lateral = gr.Image(
                        label="Grad-CAM lateral", type="numpy", format="png", interactive=False
                    )
            with gr.Accordion("Compare with the ground truth", open=True):
                reference = gr.Textbox(
                    label="Reference report (from the dataset or example, or paste one)", lines=4
                )
                compare_button = gr.Button("Compare")
                compare_metrics = gr.Markdown()
                compare_table = gr.HTML()
            with gr.Accordion("Review", open=True):
                with gr.Row():
                    verdict = gr.Radio(list(VERDICTS), label="Verdict", elem_id="verdict")
                    categories = gr.CheckboxGroup(list(ERROR_CATEGORIES), label="Error categories")
                with gr.Row():
                    note = gr.Textbox(label="Note", lines=2)
                    reviewer = gr.Textbox(label="Reviewer", elem_id="reviewer")
                    session = gr.Textbox(label="Review session", value="default")
                save_button = gr.Button("Save review", elem_id="save-review")
                review_status = gr.Markdown(elem_id="review-status")
                reviews = gr.Dataframe(
                    headers=["saved", "case", "mode", "reviewer", "verdict", "categories", "note"],
                    value=self.review_rows(),
                    interactive=False,
                )
                with gr.Row():
                    export_csv = gr.Button("Export CSV")
                    export_json = gr.Button("Export JSON")
                    export_file = gr.File(label="Export", interactive=False)

            with gr.Column(visible=False):  # the stateless API's inputs and output, not shown
                api_frontal = gr.File(type="filepath")
                api_lateral = gr.File(type="filepath")
                api_mode = gr.Textbox()
                api_report = gr.JSON()
                api_button = gr.Button()
            api_button.click(
                self.report,
                [api_frontal, api_lateral, api_mode],
                api_report,
                api_name="report",
                concurrency_limit=REPORTS_AT_ONCE,
            )

            loaded = [state, reference, frontal_image, lateral_image, meta, load_status]
            upload_button.click(
                self.load_upload,
                [state, frontal_file, lateral_file],
                loaded,
                api_name="load_upload",
            )
            example.change(self.load_example, [state, example], loaded, api_name="load_example")
            case.change(self.load_case, [state, case], loaded, api_name="load_case")
            generation = generate_button.click(
                self.generate,
                [state, mode, strategy, max_tokens, penalty, temperature, top_p],
                [findings_a, impression_a, findings_b, impression_b, stats, sentence, state],
                api_name="generate",
                concurrency_limit=REPORTS_AT_ONCE,
            )
            stop_button.click(None, None, None, cancels=[generation])
            explain_button.click(
                self.explain,
                [state, mode, sentence, opacity],
                [overlay_frontal, overlay_lateral, explain_status, state],
                api_name="explain",
            )
            opacity.release(
                self.blend, [state, opacity], [overlay_frontal, overlay_lateral], api_name=False
            )
            compare_button.click(
                self.compare,
                [state, mode, reference],
                [compare_metrics, compare_table],
                api_name="compare",
            )
            save_button.click(
                self.save_review,
                [state, mode, reference, verdict, categories, note, reviewer, session],
                [review_status, reviews, case],
                api_name="save_review",
            )
            session.submit(self.review_rows, [session], [reviews], api_name=False)
            export_csv.click(
                lambda s: self.export(s, "csv"), [session], [export_file], api_name="export_csv"
            )
            export_json.click(
                lambda s: self.export(s, "json"), [session], [export_file], api_name="export_json"
            )
        return demo
