"""The generation panel: which mode(s) write the report, streamed FINDINGS and IMPRESSION
into Report A (and Report B), and the stateless ``/report`` API.

Report A and B hold one mode each: the chosen mode alone, prompt-wise and promptbook-wise
for "compare both", or both in the blinded order of the review session, where the page then
names no mode at all.
"""

from __future__ import annotations

import time

import gradio as gr

from mrg.config import CUSTOMIZED_MODES, DEFAULT_DECODING, Decoding
from mrg.ui.common import (
    COMPARE_BOTH,
    REPORTS_AT_ONCE,
    SLOTS,
    UNEXPECTED,
    WHOLE_REPORT,
    DemoState,
    gpu,
    log_failure,
    session_name,
)

# What ``generate`` yields, in this order.
GENERATED = (
    "header_a",
    "findings_a",
    "impression_a",
    "header_b",
    "findings_b",
    "impression_b",
    "report_b",
    "stats",
    "sentence",
    "state",
)
GENERATE_INPUTS = (
    "state",
    "mode",
    "strategy",
    "max_tokens",
    "penalty",
    "temperature",
    "top_p",
    "blinded",
    "session",
    "manual_findings",
    "manual_choice",
    "allow_any",
)
OVERRIDE = "Allow any image (research): write a report even where the gate refuses it"


PAGE_UPDATE_S = (
    0.1  # a streamed report reaches the page at most this often (the first words at once)
)


class Throttle:
    """Which streamed updates go to the page: the first with words, the last, and between
    them one per ``interval`` seconds; each update the page gets costs a round of
    Gradio's post-processing, the transfer and the browser's rendering."""

    def __init__(self, interval: float):
        self.interval, self.last, self.worded = interval, None, False

    def due(self, has_words: bool, finished: bool) -> bool:
        now = time.monotonic()
        first_words = has_words and not self.worded
        if not (
            finished or first_words or (self.last is not None and now - self.last >= self.interval)
        ):
            return False
        self.last, self.worded = now, self.worded or has_words
        return True


class GenerationPanel:
    """Handlers of the generation panel; ``DemoApp`` mixes the panels together."""

    def _shown_modes(self, state: DemoState, choice: str, blinded: bool, session: str):
        """The modes for Report A and B, and their headers; a blinded order is stored."""
        if blinded:
            if not set(CUSTOMIZED_MODES) <= set(self.modes):
                raise ValueError("A blinded A/B session needs both customized checkpoints.")
            state.blinding = self.store.blinding(
                session_name(session), state.case_key, CUSTOMIZED_MODES
            )
            return [state.blinding.report_a, state.blinding.report_b], list(SLOTS)
        state.blinding = None
        modes = list(CUSTOMIZED_MODES) if choice == COMPARE_BOTH else [choice]
        return modes, modes

    def _message(self, state: DemoState, text: str):
        return "", "", "", "", "", "", gr.update(), text, gr.update(), state

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
        blinded: bool = False,
        session: str = "default",
        manual: bool = False,
        chosen: list[str] | None = None,
        allow_any: bool = False,
    ):
        """Stream the ``GENERATED`` outputs while Report A, then Report B, is written.

        ``manual``: write from the findings ``chosen`` by hand (display names; none ticked is
        a normal study) instead of the findings head's reading (what-if). ``allow_any``:
        write even where the chest-radiograph gate refuses the study (the header warns)."""
        from mrg.service import StudyRefused

        if state.study is None:
            yield self._message(state, "**Load a study first.**")
            return
        try:
            decoding = Decoding(
                strategy=strategy,
                max_new_tokens=int(max_tokens),
                repetition_penalty=float(penalty),
                temperature=float(temperature),
                top_p=float(top_p),
            ).validate()
            findings = self.findings_to_write_from(state, manual, chosen)
            modes, headers = self._shown_modes(state, mode, blinded, session)
        except ValueError as err:
            yield self._message(state, f"**Cannot generate:** {err}")
            return
        state.shown, state.generated, state.heatmaps, state.conditions = modes, {}, [], {}
        boxes = ["", "", "", ""]
        two = gr.update(visible=len(modes) > 1)
        titles = [f"**{header}**" for header in headers]
        stats = []

        def out(status, sentence=None):
            return (
                titles[0],
                boxes[0],
                boxes[1],
                titles[1] if len(modes) > 1 else "",
                boxes[2],
                boxes[3],
                two,
                status,
                gr.update() if sentence is None else sentence,
                state,
            )

        # the verdict made with the reading at upload: the study is not screened again
        screening = state.screening if findings is not None and findings is state.reading else None
        for slot, current in enumerate(modes):
            update, shown = None, Throttle(PAGE_UPDATE_S)
            try:
                stream = self.service.stream(
                    state.study,
                    current,
                    decoding,
                    findings=findings,
                    allow_anyway=allow_any,
                    screening=screening,
                )
                for update in stream:
                    if not shown.due(bool(update.findings), update.finished):
                        continue
                    titles[slot] = f"**{headers[slot]}**" + self.written_from(
                        current, update.condition
                    )
                    if update.screening is not None and update.screening.warning:
                        titles[slot] += f"  \n⚠️ **{update.screening.warning}**"
                    boxes[2 * slot], boxes[2 * slot + 1] = update.findings, update.impression
                    yield out(f"Generating {headers[slot]}… {update.tokens} tokens")
            except StudyRefused as err:
                state.screening = err.screening
                yield out(
                    f"**No report: {err}** To write one anyway (research), tick "
                    f"*{OVERRIDE.split(':')[0]}* under Advanced decoding."
                )
                return
            except ValueError as err:  # e.g. findings set by hand for a model that takes none
                said = str(err).replace(current, headers[slot])  # a blinded page names no mode
                yield out(f"**Cannot generate {headers[slot]}:** {said}")
                return
            except Exception as err:  # noqa: BLE001 — a model failure must not take the app down
                from mrg.batching import ServiceBusy

                if isinstance(err, ServiceBusy):
                    yield out(f"**{err}**")
                    return
                log_failure("generation", err)
                yield out(
                    "**The model failed on this study.** Please try again or load another study."
                )
                return
            state.generated[current] = update.text if update else ""
            state.conditions[current] = update.condition if update else None
            state.screening = update.screening if update else state.screening
            if update is not None:
                rate = f"{update.tokens_per_s:.1f} tokens/s" if update.tokens_per_s else "—"
                ttft = f"{update.ttft_s:.2f} s" if update.ttft_s is not None else "—"
                stats.append(
                    f"**{headers[slot]}**: {update.tokens} tokens, first token after {ttft}, {rate}"
                )
        from mrg.service import report_sentences

        choices = [WHOLE_REPORT] + report_sentences(state.report(0)[1])
        yield out(" · ".join(stats), gr.update(choices=choices, value=WHOLE_REPORT))

    # ------------------------------------------------------------------ stateless API

    @gpu
    def report(
        self,
        frontal: str | None,
        lateral: str | None,
        mode: str | None,
        allow_any_modality: bool = False,
    ) -> dict:
        """One study in, its report out, with no session (``api_name="/report"``).

        Greedy decoding with the app's defaults. Unusable input raises ``gr.Error`` with the
        message the page would show, which ``gradio_client`` raises as ``AppError``. A study
        the chest-radiograph gate refuses is answered, not raised: ``refused`` holds the
        reason's code (None for a report), ``message`` what the page says, ``gate`` the scores.
        """
        from mrg.imaging import ImageError
        from mrg.service import StudyRefused

        mode = mode or CUSTOMIZED_MODES[0]
        if mode not in self.modes:
            raise gr.Error(f"mode must be one of {', '.join(self.modes)}, got {mode!r}")
        if not frontal:
            raise gr.Error("Give a frontal chest X-ray (PNG, JPEG or DICOM).")
        try:
            study = self._study_from(*self._read_uploads(frontal, lateral))
            update = self.service.generate(study, mode, allow_anyway=bool(allow_any_modality))
        except StudyRefused as err:
            return {
                "refused": err.screening.refused,
                "message": str(err),
                "gate": err.screening.as_dict(),
                "mode": mode,
                "text": "",
            }
        except ImageError as err:
            raise gr.Error(f"Could not load the study. {err}") from None
        except Exception as err:  # noqa: BLE001
            from mrg.batching import ServiceBusy

            if isinstance(err, ServiceBusy):
                raise gr.Error(str(err)) from None
            log_failure("the report API", err)
            raise gr.Error(UNEXPECTED) from None
        return {
            "refused": None,
            "warning": update.screening.warning if update.screening else "",
            "gate": update.screening.as_dict() if update.screening else None,
            "findings": update.findings,
            "impression": update.impression,
            "text": update.text,
            "mode": mode,
            "checkpoint": self.service.info.checkpoints.get(mode, "untrained"),
            "tokens": update.tokens,
            "views": [v.position for v in study.views],
            "findings_head": update.condition.as_dict() if update.condition else None,
        }

    # ------------------------------------------------------------------ layout

    def _build_generation(self, c: dict, modes: list[str]) -> None:
        with gr.Row():
            c["mode"] = gr.Radio(
                modes, value=modes[0], label="Prompt customization", elem_id="mode", scale=3
            )
            with gr.Column(scale=1, min_width=100):
                c["generate"] = gr.Button("Generate report", variant="primary", elem_id="generate")
                c["stop"] = gr.Button("Stop", variant="stop", size="sm")
        c["header_a"] = gr.Markdown(elem_id="header-a")
        c["findings_a"] = gr.Textbox(label="FINDINGS", lines=5, max_lines=9, elem_id="findings")
        c["impression_a"] = gr.Textbox(
            label="IMPRESSION", lines=2, max_lines=4, elem_id="impression"
        )
        with gr.Column(visible=False) as c["report_b"]:
            c["header_b"] = gr.Markdown(elem_id="header-b")
            c["findings_b"] = gr.Textbox(
                label="FINDINGS", lines=4, max_lines=8, elem_id="findings-b"
            )
            c["impression_b"] = gr.Textbox(
                label="IMPRESSION", lines=2, max_lines=4, elem_id="impression-b"
            )
        c["stats"] = gr.Markdown(elem_id="stats")

    def _build_decoding(self, c: dict) -> None:
        with gr.Accordion("Advanced decoding", open=False), gr.Row():
            c["strategy"] = gr.Radio(
                ["greedy", "beam", "sample"],
                value="greedy",
                label="Strategy (beam does not stream)",
            )
            c["max_tokens"] = gr.Slider(
                16,  # both headers and a word in each section take 11 tokens
                200,
                value=DEFAULT_DECODING.max_new_tokens,
                step=1,
                label="Max new tokens",
            )
            c["penalty"] = gr.Slider(
                1.0,
                2.5,
                value=DEFAULT_DECODING.repetition_penalty,
                step=0.05,
                label="Repetition penalty",
            )
            c["temperature"] = gr.Slider(
                0.1, 1.5, value=0.7, step=0.05, label="Temperature (sampling)"
            )
            c["top_p"] = gr.Slider(0.1, 1.0, value=0.9, step=0.05, label="Top-p (sampling)")
            c["allow_any"] = gr.Checkbox(False, label=OVERRIDE, elem_id="allow-any")

    def _build_report_api(self, c: dict) -> None:
        with gr.Column(visible=False):  # the stateless API's inputs and output, not shown
            c["api_frontal"] = gr.File(type="filepath")
            c["api_lateral"] = gr.File(type="filepath")
            c["api_mode"] = gr.Textbox()
            c["api_allow"] = gr.Checkbox(False)
            c["api_report"] = gr.JSON()
            c["api_button"] = gr.Button()

    def _wire_generation(self, c: dict):
        """Returns the generation event, for what follows it (comparison, Grad-CAM)."""
        c["api_button"].click(
            self.report,
            [c["api_frontal"], c["api_lateral"], c["api_mode"], c["api_allow"]],
            c["api_report"],
            api_name="report",
            concurrency_limit=REPORTS_AT_ONCE,
        )
        generation = c["generate"].click(
            self.generate,
            [c[name] for name in GENERATE_INPUTS],
            [c[name] for name in GENERATED],
            api_name="generate",
            concurrency_limit=REPORTS_AT_ONCE,
            show_progress="hidden",
        )
        c["stop"].click(None, None, None, cancels=[generation])
        return generation
