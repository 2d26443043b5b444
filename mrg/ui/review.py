"""The review panel: verdicts and error categories per report, the blinded A/B preference, the
review queue over a dataset (or the examples), the session summary and the exports.

In a blinded session the page shows "Report A" and "Report B" only; the store keeps the
real modes (``ReviewStore.blinding``), revealed in the exports and the summary.
Keyboard: 1/2/3 verdict of Report A, 4/5/6 of Report B, a/b/e preference, s save,
n/p next/previous case, u next unreviewed, g generate (``KEYBOARD_JS``).
"""

from __future__ import annotations

import gradio as gr

from mrg.review import ERROR_CATEGORIES, PREFERENCES, VERDICTS, Review, ReviewError
from mrg.ui.common import (
    SLOTS,
    UNEXPECTED,
    DemoState,
    dataset_key,
    example_key,
    log_failure,
    session_name,
)
from mrg.ui.summary import ReviewSummary

REVIEW_COLUMNS = ("saved", "case", "report", "reviewer", "verdict", "categories", "note")
SAVED = ("review_status", "reviews", "progress")
SAVE_INPUTS = (
    "state",
    "reference",
    "verdict_a",
    "categories_a",
    "verdict_b",
    "categories_b",
    "preference",
    "note",
    "reviewer",
    "session",
)
KEYBOARD_JS = """
<script>
document.addEventListener("keydown", (event) => {
  const target = event.target;
  const typing = target && (target.tagName === "TEXTAREA" || target.isContentEditable ||
    (target.tagName === "INPUT" && !["radio", "checkbox"].includes(target.type)));
  if (typing || event.ctrlKey || event.metaKey || event.altKey) return;
  const verdicts = ["acceptable", "minor error", "major error"];
  const keys = {
    "1": `#verdict-a input[value="${verdicts[0]}"]`, "2": `#verdict-a input[value="${verdicts[1]}"]`,
    "3": `#verdict-a input[value="${verdicts[2]}"]`, "4": `#verdict-b input[value="${verdicts[0]}"]`,
    "5": `#verdict-b input[value="${verdicts[1]}"]`, "6": `#verdict-b input[value="${verdicts[2]}"]`,
    "a": '#preference input[value="A"]', "b": '#preference input[value="B"]',
    "e": '#preference input[value="equal"]', "s": "#save-review", "n": "#next-case",
    "p": "#previous-case", "u": "#next-unreviewed", "g": "#generate",
  };
  const element = keys[event.key] && document.querySelector(keys[event.key]);
  if (element) { element.click(); event.preventDefault(); }
});
</script>
"""


class ReviewPanel(ReviewSummary):
    """Handlers of the review panel; ``DemoApp`` mixes the panels together."""

    # ------------------------------------------------------------------ verdicts

    def save_review(
        self,
        state: DemoState,
        reference: str,
        verdict_a: str | None,
        categories_a: list[str] | None,
        verdict_b: str | None,
        categories_b: list[str] | None,
        preference: str | None,
        note: str,
        reviewer: str,
        session: str,
    ):
        """The ``SAVED`` outputs: a verdict per shown report (and the preference, blinded)."""
        session = session_name(session)
        try:
            if not state.shown:
                raise ReviewError("Generate a report before saving a review.")
            given = [(verdict_a, categories_a), (verdict_b, categories_b)][: len(state.shown)]
            reviews = []
            for slot, (verdict, categories) in enumerate(given):
                mode, text = state.report(slot)
                if not verdict:
                    raise ReviewError(f"Choose a verdict for {SLOTS[slot]}.")
                reviews.append(
                    Review(
                        session=session,
                        case_key=state.case_key,
                        mode=mode,
                        reviewer=(reviewer or "").strip(),
                        verdict=verdict,
                        categories=list(categories or []),
                        note=note or "",
                        generated=text,
                        reference=reference or "",
                        checkpoint=self.service.info.checkpoints.get(mode, "untrained"),
                        gate=state.screening.as_dict() if state.screening else {},
                    ).validate()
                )
            if state.blinding and preference not in PREFERENCES:
                raise ReviewError("Choose which report you prefer: A, B or equal.")
            for review in reviews:
                self.store.save(review)
            if state.blinding:
                self.store.save_preference(session, state.case_key, reviews[0].reviewer, preference)
        except ReviewError as err:
            return f"**Not saved:** {err}", self.review_rows(session), self.progress(session)
        except Exception as err:  # noqa: BLE001 — e.g. the review database is locked or full
            log_failure("saving a review", err)
            return f"**Not saved.** {UNEXPECTED}", self.review_rows(session), self.progress(session)
        if state.blinding:
            said = ", ".join(f"{SLOTS[i]} {r.verdict}" for i, r in enumerate(reviews))
            said += f"; preferred {preference}"
        else:
            said = ", ".join(f"{r.verdict} ({r.mode})" for r in reviews)
        return (
            f"Saved: {said} for {state.case_key} by {reviews[0].reviewer}.",
            self.review_rows(session),
            self.progress(session),
        )

    def review_rows(self, session: str = "") -> list[list[str]]:
        """The session's reviews; in a blinded case the report is named by its slot only."""
        session = session_name(session)
        blinded = {p["case_key"]: p for p in self.store.preferences(session)}
        rows = []
        for r in self.store.reviews(session):
            shown = r.mode
            if r.case_key in blinded:
                shown = SLOTS[0] if blinded[r.case_key]["report_a"] == r.mode else SLOTS[1]
            categories = "; ".join(r.categories)
            rows.append(
                [r.created_at, r.case_key, shown, r.reviewer, r.verdict, categories, r.note]
            )
        return rows

    # ------------------------------------------------------------------ queue

    @property
    def queue(self) -> list[tuple[str, str]]:
        """``(case key, choice)`` of every case to review: the dataset's, else the examples."""
        if self.dataset:
            return [(dataset_key(r), r.study_id) for r in self.dataset.values()]
        return [(example_key(label), label) for label in self.examples]

    def progress(self, session: str = "") -> str:
        reviewed = self.store.reviewed_keys(session_name(session))
        done = sum(key in reviewed for key, _ in self.queue)
        return f"**{done} of {len(self.queue)} reviewed**"

    def load_case(self, state: DemoState, choice: str | None):
        """Load a dataset case (or, without a dataset, an example) by its queue choice."""
        choices = [choice for _, choice in self.queue]
        if not self.dataset:
            loaded = self.load_example(state, choice)
        else:
            record = self.dataset.get(choice or "")
            if record is None:
                return self._failed(state, "Choose a case from the dataset.")
            loaded = self._load(
                state,
                lambda: (record.image_paths, dataset_key(record)),
                record.report,
                f"Case {record.study_id} loaded.",
            )
        if choice in choices and state.case_key == self.queue[choices.index(choice)][0]:
            state.position = choices.index(choice)
        return loaded

    def go(self, state: DemoState, session: str, step: str):
        """Move through the queue: ``previous``, ``next`` or ``unreviewed`` (the next case
        without a review in this session, wrapping around). Loaded outputs, then the progress
        and the case chosen."""
        queue = self.queue
        if not queue:
            return *self._failed(state, "No cases to review."), self.progress(session), gr.update()
        here = -1 if state.position is None else state.position
        if step == "unreviewed":
            reviewed = self.store.reviewed_keys(session_name(session))
            ahead = [(here + i) % len(queue) for i in range(1, len(queue) + 1)]
            todo = [i for i in ahead if queue[i][0] not in reviewed]
            if not todo:
                done = "Every case of this session is reviewed."
                return *self._failed(state, done), self.progress(session), gr.update()
            target = todo[0]
        else:
            target = max(0, here - 1) if step == "previous" else min(len(queue) - 1, here + 1)
        choice = queue[target][1]
        return *self.load_case(state, choice), self.progress(session), choice

    # ------------------------------------------------------------------ layout

    def _build_queue(self, c: dict) -> None:
        with gr.Row():
            c["case"] = gr.Dropdown(
                [choice for _, choice in self.queue],
                label="Case" if self.dataset else "Review queue (the examples)",
                value=None,
                elem_id="case",
                scale=3,
            )
            c["previous_case"] = gr.Button("◀ Previous (p)", elem_id="previous-case", size="sm")
            c["next_case"] = gr.Button("Next (n) ▶", elem_id="next-case", size="sm")
            c["next_unreviewed"] = gr.Button(
                "Next unreviewed (u)", elem_id="next-unreviewed", size="sm"
            )
            c["progress"] = gr.Markdown(self.progress(), elem_id="progress")

    def _build_review(self, c: dict) -> None:
        with gr.Accordion("Review", open=True):
            with gr.Row():
                c["session"] = gr.Textbox(label="Review session", value="default", scale=1)
                c["reviewer"] = gr.Textbox(label="Reviewer", elem_id="reviewer", scale=1)
                c["blinded"] = gr.Checkbox(
                    label="Blinded A/B: the two customized modes as Report A and Report B, in "
                    "a random order per case; the page names no mode",
                    value=False,
                    elem_id="blinded",
                    scale=2,
                )
            with gr.Row():
                with gr.Column():
                    c["verdict_a"] = gr.Radio(
                        list(VERDICTS), label="Report A: verdict (1/2/3)", elem_id="verdict-a"
                    )
                    c["categories_a"] = gr.CheckboxGroup(
                        list(ERROR_CATEGORIES), label="Report A: errors"
                    )
                with gr.Column(visible=False) as c["review_b"]:
                    c["verdict_b"] = gr.Radio(
                        list(VERDICTS), label="Report B: verdict (4/5/6)", elem_id="verdict-b"
                    )
                    c["categories_b"] = gr.CheckboxGroup(
                        list(ERROR_CATEGORIES), label="Report B: errors"
                    )
                with gr.Column(visible=False) as c["preference_column"]:
                    c["preference"] = gr.Radio(
                        list(PREFERENCES), label="Preferred report (a/b/e)", elem_id="preference"
                    )
            with gr.Row():
                c["note"] = gr.Textbox(label="Note", lines=1, scale=3)
                c["save"] = gr.Button("Save review (s)", elem_id="save-review", scale=1)
            c["review_status"] = gr.Markdown(elem_id="review-status")
            c["reviews"] = gr.Dataframe(
                headers=list(REVIEW_COLUMNS), value=self.review_rows(), interactive=False
            )
        with gr.Accordion("Session summary and export", open=False):
            with gr.Row():
                c["summarize"] = gr.Button("Summarize the session", elem_id="summarize")
                c["export_csv"] = gr.Button("Export CSV")
                c["export_json"] = gr.Button("Export JSON", elem_id="export-json")
            c["summary"] = gr.Markdown(elem_id="summary")
            c["summary_plot"] = gr.Plot(label="Summary")
            c["export_file"] = gr.File(
                label="Export", interactive=False, elem_id="export-file", height=80
            )

    def _wire_review(self, c: dict, loaded: list, generation) -> list:
        """Returns the events that load a case, for what follows a study's loading."""
        queue_outputs = [*loaded, c["progress"], c["case"]]
        loads = [
            button.click(
                lambda state, session, step=step: self.go(state, session, step),
                [c["state"], c["session"]],
                queue_outputs,
                api_name=f"queue_{step}",
            )
            for button, step in (
                (c["previous_case"], "previous"),
                (c["next_case"], "next"),
                (c["next_unreviewed"], "unreviewed"),
            )
        ]
        loads.append(
            c["case"].input(self.load_case, [c["state"], c["case"]], loaded, api_name="load_case")
        )
        c["save"].click(
            self.save_review,
            [c[name] for name in SAVE_INPUTS],
            [c[name] for name in SAVED],
            api_name="save_review",
        )
        for event in (c["session"].submit, c["session"].blur):
            event(
                lambda s: (self.review_rows(s), self.progress(s)),
                [c["session"]],
                [c["reviews"], c["progress"]],
                api_name=False,
            )
        generation.then(
            self._review_layout,
            [c["state"]],
            [c["review_b"], c["preference_column"]],
            api_name=False,
        )
        c["summarize"].click(
            self.summary, [c["session"]], [c["summary"], c["summary_plot"]], api_name="summary"
        )
        c["export_csv"].click(
            lambda s: self.export(s, "csv"),
            [c["session"]],
            [c["export_file"]],
            api_name="export_csv",
        )
        c["export_json"].click(
            lambda s: self.export(s, "json"),
            [c["session"]],
            [c["export_file"]],
            api_name="export_json",
        )
        return loads

    @staticmethod
    def _review_layout(state: DemoState):
        """Report B's verdict where two reports are shown; the preference where blinded."""
        return gr.update(visible=len(state.shown) > 1), gr.update(visible=bool(state.blinding))
