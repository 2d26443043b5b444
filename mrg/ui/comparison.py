"""The comparison panel: the reference report beside the generated one, the CheXpert label
agreement marked inline in both texts (matched / missed / hallucinated), the table below.

Runs by itself when a report is finished, and again when the reference is edited.
"""

from __future__ import annotations

import html

import gradio as gr

from mrg.ui.common import SLOTS, UNEXPECTED, DemoState, log_failure

AGREEMENT_COLOURS = {"matched": "#1b7f3b", "missed": "#b26a00", "hallucinated": "#b00020"}
COMPARED = ("compare_metrics", "reference_view", "generated_view", "compare_table")
COMPARE_INPUTS = ("state", "compare_slot", "reference")
# Where one sentence carries several findings, the error shows.
_PRIORITY = {"matched": 0, "missed": 1, "hallucinated": 1}


def marked(text: str, marks: dict[str, tuple[str, list[str]]]) -> str:
    """``text`` as HTML with each sentence of ``marks`` (sentence → (agreement, findings))
    wrapped in a coloured ``<mark>`` titled with its findings."""
    spans = []
    for sentence, (agreement, findings) in marks.items():
        start = text.find(sentence)
        if start >= 0:
            spans.append((start, start + len(sentence), agreement, findings))
    out, at = [], 0
    for start, end, agreement, findings in sorted(spans):
        if start < at:  # overlapping sentences: the first one keeps its mark
            continue
        title = html.escape(f"{', '.join(findings)}: {agreement}")
        out.append(html.escape(text[at:start]))
        out.append(
            f"<mark class='agree-{agreement}' title='{title}' style='background:"
            f"{AGREEMENT_COLOURS[agreement]}22;border-bottom:2px solid "
            f"{AGREEMENT_COLOURS[agreement]}'>{html.escape(text[start:end])}</mark>"
        )
        at = end
    out.append(html.escape(text[at:]))
    return "".join(out).replace("\n", "<br>")


def sentence_marks(rows, side: str) -> dict[str, tuple[str, list[str]]]:
    """sentence → (agreement, findings) for the ``reference`` or ``generated`` side."""
    marks: dict[str, tuple[str, list[str]]] = {}
    for row in rows:
        for sentence in getattr(row, f"{side}_sentences"):
            agreement, findings = marks.get(sentence, (row.agreement, []))
            if _PRIORITY[row.agreement] > _PRIORITY[agreement]:
                agreement = row.agreement
            marks[sentence] = (agreement, [*findings, row.observation])
    return marks


class ComparisonPanel:
    """Handlers of the comparison; ``DemoApp`` mixes the panels together."""

    def compare(self, state: DemoState, slot: str, reference: str):
        """The ``COMPARED`` outputs for Report A or B against ``reference``."""
        index = SLOTS.index(slot) if slot in SLOTS else 0
        mode, generated = state.report(index)
        reference = (reference or "").strip()
        plain = marked(reference, {})
        if not generated:
            return "Generate a report to compare it with the reference.", plain, "", ""
        if not reference:
            return "**Paste or load a reference report to compare with.**", "", "", ""
        try:
            result = self.service.compare(generated, reference)
        except Exception as err:  # noqa: BLE001
            log_failure("comparison", err)
            return f"**Cannot compare.** {UNEXPECTED}", plain, "", ""
        metrics = " · ".join(f"{k.replace('_', '-')} {v:.3f}" for k, v in result.metrics.items())
        notes = (" " + " ".join(result.notes)) if result.notes else ""
        name = SLOTS[index] if state.blinding else mode
        return (
            f"**{name} vs reference:** {metrics}.{notes}",
            marked(reference, sentence_marks(result.rows, "reference")),
            marked(generated, sentence_marks(result.rows, "generated")),
            self.label_table(result.rows),
        )

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
            "<th>in the reference</th><th>in the report</th></tr></thead><tbody>"
            + "".join(body)
            + "</tbody></table>"
        )

    # ------------------------------------------------------------------ layout

    def _build_comparison(self, c: dict) -> None:
        c["compare_slot"] = gr.Radio(
            list(SLOTS), value=SLOTS[0], label="Compare with the reference", elem_id="compare-slot"
        )
        c["compare_metrics"] = gr.Markdown(elem_id="compare-metrics")
        gr.Markdown("**Reference**")
        c["reference_view"] = gr.HTML(elem_id="reference-view")
        gr.Markdown("**Generated, marked**")
        c["generated_view"] = gr.HTML(elem_id="generated-view")
        c["compare_table"] = gr.HTML(elem_id="compare-table")
        with gr.Accordion("Edit or paste the reference", open=False):
            c["reference"] = gr.Textbox(
                label="Reference report (from the dataset or example, or paste one)",
                lines=4,
                elem_id="reference",
            )

    def _wire_comparison(self, c: dict, generation) -> None:
        inputs = [c[name] for name in COMPARE_INPUTS]
        outputs = [c[name] for name in COMPARED]
        generation.then(self.compare, inputs, outputs, api_name=False)
        c["reference"].change(self.compare, inputs, outputs, api_name="compare")
        c["compare_slot"].input(self.compare, inputs, outputs, api_name=False)
