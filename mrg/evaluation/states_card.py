"""The model card's section on what a radiologist reads: calibration, states, content, form
and state fidelity, each table from the measurements ``scripts/build_model_card.py`` makes."""

from __future__ import annotations

from mrg.text.taxonomy import FINDINGS14, display_name

NORMAL_TEMPLATE = (
    "FINDINGS: The heart is normal in size. The mediastinum is unremarkable. The lungs are "
    "clear. No pleural effusion or pneumothorax.\nIMPRESSION: No acute cardiopulmonary "
    "abnormality."
)


def calibration_table(calibration: dict) -> str:
    """Markdown: ECE and Brier per finding, before and after calibration, on the test split."""
    before, after = calibration["before"], calibration["after"]
    header = (
        "| finding | test rate | mean p before | mean p after | ECE before | ECE after | "
        "Brier before | Brier after |"
    )
    lines = [header, "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for f in FINDINGS14:
        b, a = before["per_finding"][f], after["per_finding"][f]
        lines.append(
            f"| {display_name(f)} | {a['rate']:.3f} | {b['mean_p']:.3f} | {a['mean_p']:.3f} | "
            f"{b['ece']:.3f} | {a['ece']:.3f} | {b['brier']:.3f} | {a['brier']:.3f} |"
        )
    lines.append(
        f"| **all 14** | | | | **{before['ece']:.3f}** | **{after['ece']:.3f}** | "
        f"{before['brier']:.3f} | {after['brier']:.3f} |"
    )
    return "\n".join(lines) + "\n"


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{value:.0%}"


def content_table(content: dict[str, dict]) -> str:
    """Markdown: per model or baseline, what its reports state against the NIH labels."""
    header = (
        "| reports | stated present: precision | normal films with none present | "
        "present or possible per report | CE micro-F1, possible counted | precision | recall |"
    )
    lines = [header, "|---|---:|---:|---:|---:|---:|---:|"]
    for name, c in content.items():
        w = c["with_possible"]
        lines.append(
            f"| {name} | {c['present_precision']:.2f} | {_pct(c['normal_without_present'])} | "
            f"{c['named_per_report']:.2f} | **{w['f1']:.3f}** | {w['precision']:.3f} | "
            f"{w['recall']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def form_table(form: dict[str, dict]) -> str:
    """Markdown: per source of text, the form counts (``mrg.evaluation.states_eval.form``)."""
    header = (
        "| text | heart, lungs and pleura all addressed | words per report | 25–60 words | "
        "global-normal beside a present finding | affirm and negate | words outside the "
        "report vocabulary |"
    )
    lines = [header, "|---|---:|---:|---:|---:|---:|---:|"]
    for name, f in form.items():
        outside = f.get("outside_vocabulary")
        lines.append(
            f"| {name} | {f['anatomy_all']:.0%} | {f['words_mean']:.1f} | "
            f"{f['words_in_range']:.0%} | {f['global_normal_beside_present']:.1%} | "
            f"{f['affirm_and_negate']:.1%} | {'–' if outside is None else f'{outside:.3f}'} |"
        )
    return "\n".join(lines) + "\n"


def language_table(language: dict[str, dict]) -> str:
    """Markdown: state fidelity (in all and per state) and BLEU-4 / CIDEr against the real
    report, per model and baseline, on held-out OpenI reports."""
    header = (
        "| writer | reports | state fidelity | present read back | possible read back | "
        "absent read back | BLEU-4 | CIDEr |"
    )
    lines = [header, "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, row in language.items():
        states = row.get("states")
        if states:
            per = states["per_state"]
            cells = [f"**{states['fidelity']:.2f}**"] + [
                f"{per[s]['read_back']} of {per[s]['stated']}"
                for s in ("present", "possible", "absent")
            ]
        else:
            cells = ["–"] * 4
        lines.append(
            f"| {name} | {row['reports']} | " + " | ".join(cells) + f" | {row['BLEU_4']:.3f} | "
            f"{row['CIDEr']:.3f} |"
        )
    return "\n".join(lines) + "\n"
