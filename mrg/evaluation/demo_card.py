"""Scoring and the measured facts of the demo checkpoints' model card: clinical efficacy and
BLEU-4/CIDEr of generated reports, verdicts against the baselines (``mrg.evaluation.baselines``),
pair and alignment statistics, the card's tables, and ``assets/MODEL_CARD.template.md`` filled in.

``scripts/build_model_card.py`` measures the shipped files; this module says what was measured.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import torch

from mrg.data.datasets import StudyRecord
from mrg.data.views import Views
from mrg.evaluation.metrics import label_agreement, nlg_scores
from mrg.text.labeler import ReportLabeler
from mrg.text.taxonomy import FINDINGS14

MODEL_CARD_TEMPLATE = Path(__file__).resolve().parents[2] / "assets" / "MODEL_CARD.template.md"


def score(rows: list[dict], image_labels: dict[str, list[str]], labeler: ReportLabeler) -> dict:
    """CE of generated text against the image's NIH labels, and BLEU-4/CIDEr against the paired report."""
    truth = [{label: int(label in image_labels[r["id"]]) for label in FINDINGS14} for r in rows]
    predicted = [labeler.label14(r["generated"]) for r in rows]
    ce = label_agreement(truth, predicted, FINDINGS14)
    normal_truth = [int(not image_labels[r["id"]]) for r in rows]
    normal_pred = [p["normal"] for p in predicted]
    normal_acc = sum(a == b for a, b in zip(normal_truth, normal_pred)) / len(rows)
    nlg = nlg_scores([r["reference"] for r in rows], [r["generated"] for r in rows], meteor=False)
    return {
        "studies": len(rows),
        "CE_micro_P": ce.micro.precision,
        "CE_micro_R": ce.micro.recall,
        "CE_micro_F1": ce.micro.f1,
        "CE_macro_F1": ce.macro.f1,
        "normal_accuracy": normal_acc,
        "BLEU_4": nlg.corpus["BLEU_4"],
        "CIDEr": nlg.corpus["CIDEr"],
    }


def read_log(log_file: Path) -> list[dict]:
    """The per-epoch records of a run's ``log.jsonl`` (none where the run has not started)."""
    if not log_file.is_file():
        return []
    return [json.loads(line) for line in log_file.read_text().splitlines()]


def training_seconds(records: list[dict]) -> float:
    """Sum of the epochs' training time (resumed runs included; validation excluded)."""
    return sum(r.get("epoch_seconds", 0.0) for r in records)


CARD_METRICS = (
    "CE_micro_P",
    "CE_micro_R",
    "CE_micro_F1",
    "CE_macro_F1",
    "normal_accuracy",
    "BLEU_4",
    "CIDEr",
)


def markdown(results: dict[str, dict]) -> str:
    keys = CARD_METRICS
    lines = ["| model | studies | " + " | ".join(keys) + " |", "|---|---:|" + "---:|" * len(keys)]
    for name, m in results.items():
        lines.append(
            f"| {name} | {m['studies']} | " + " | ".join(f"{m[k]:.3f}" for k in keys) + " |"
        )
    return "\n".join(lines) + "\n"


def common_report_shift(
    train: list[StudyRecord], test: list[StudyRecord], labeler: ReportLabeler
) -> dict:
    """The findings of the most common training report and their share of train / test images."""
    report = Counter(r.report for r in train).most_common(1)[0][0]
    found = labeler.label14(report)
    labels = {f for f in FINDINGS14 if found[f]}

    def share(records):
        images = {r.image_paths[0]: set(r.labels) for r in records}
        return sum(bool(labels & found) for found in images.values()) / len(images)

    return {
        "common_labels": ", ".join(sorted(labels)) or "none (normal)",
        "common_train_share": share(train),
        "common_test_share": share(test),
    }


def best_baseline(results: dict[str, dict]) -> float:
    """The highest CE micro-F1 among the trivial baselines."""
    return max(m["CE_micro_F1"] for name, m in results.items() if name.startswith("baseline"))


def ceiling_verdict(ceiling: dict, results: dict[str, dict]) -> str:
    """Whether a direct classifier naming one or two findings would beat the best baseline."""
    best = best_baseline(results)
    beaten = [k for k in sorted(ceiling["probe"]) if ceiling["probe"][k] > best]
    if not beaten:
        return f"Not even the probe reaches the best trivial baseline ({best:.3f}) for any k."
    return (
        f"The probe beats the best trivial baseline ({best:.3f}) only when it names at least "
        f"{beaten[0]} finding{'s' if beaten[0] > 1 else ''} per image."
    )


def ceiling_table(ceiling: dict) -> str:
    ks = sorted(ceiling["probe"])
    rows = [
        "| findings named per image | " + " | ".join(f"k = {k}" for k in ks) + " |",
        "|---|" + "---:|" * len(ks),
        "| linear probe on the frozen stem's features, k most likely | "
        + " | ".join(f"{ceiling['probe'][k]:.3f}" for k in ks)
        + " |",
        "| the k findings most frequent in training (no image) | "
        + " | ".join(f"{ceiling['constant'][k]:.3f}" for k in ks)
        + " |",
    ]
    return "\n".join(rows) + "\n"


def pair_statistics(train_reports: list[str], test_reports: list[str]) -> dict:
    """How often training reports are reused, and how often the most used one is a test reference."""
    uses = Counter(train_reports)
    top, max_use = uses.most_common(1)[0]
    return {
        "train_pairs": len(train_reports),
        "distinct": len(uses),
        "max_use": max_use,
        "test_same": test_reports.count(top),
    }


def alignment_retrieval(records: list[dict]) -> dict[str, str]:
    """The first and last alignment epochs' validation retrieval accuracy and its chance level."""
    epochs = [r for r in records if "val_retrieval_acc" in r]
    if not epochs:
        return {k: "n/a" for k in ("retrieval_first", "retrieval", "chance", "alignment_verdict")}
    last, chance = epochs[-1]["val_retrieval_acc"], epochs[-1]["val_retrieval_chance"]
    # About 10 validation batches: differences under 0.05 are within noise.
    verdict = (
        "the aligned encoder retrieves better than chance, so the customizer has some signal"
        if last > chance + 0.05
        else "on this many images contrastive alignment does not generalise measurably beyond "
        "chance, so the generation stage learns mostly the report style and the label prior"
    )
    return {
        "retrieval_first": f"{epochs[0]['val_retrieval_acc']:.3f}",
        "retrieval": f"{last:.3f}",
        "chance": f"{chance:.3f}",
        "alignment_verdict": verdict,
    }


def verdict(results: dict[str, dict]) -> str:
    """Say plainly whether each customized mode beats both trivial baselines on CE micro-F1."""
    best = best_baseline(results)
    others = {
        name: results[name]["CE_micro_F1"] for name in ("static", COMPOSED) if name in results
    }
    lines = []
    for name, metrics in results.items():
        if name.startswith("baseline") or name in others:
            continue
        f1 = metrics["CE_micro_F1"]
        beats = f1 > best
        versus = "".join(
            f"; {'above' if f1 > x else 'equal to' if f1 == x else 'below'} {other} ({x:.3f})"
            for other, x in others.items()
        )
        lines.append(
            f"- {name}: CE micro-F1 {f1:.3f} "
            f"{'beats' if beats else 'does NOT beat'} the best trivial baseline ({best:.3f})"
            f"{versus}."
        )
    return "\n".join(lines)


RANDOM_REPORT = "baseline: random training report"
COMPOSED = "composed, no training (probe → sentences → frozen LLM)"


def floor_verdict(results: dict[str, dict]) -> str:
    """The report-language floors, per customized mode: BLEU-4 and CIDEr above a random
    training report's, CE micro-F1 at least the random report's and at least static's."""
    random_report, static = results[RANDOM_REPORT], results.get("static")
    lines = []
    for name, m in results.items():
        if name.startswith("baseline") or name in ("static", COMPOSED):
            continue
        checks = [
            (
                "BLEU-4",
                m["BLEU_4"],
                random_report["BLEU_4"],
                "a random report",
                m["BLEU_4"] > random_report["BLEU_4"],
            ),
            (
                "CIDEr",
                m["CIDEr"],
                random_report["CIDEr"],
                "a random report",
                m["CIDEr"] > random_report["CIDEr"],
            ),
            (
                "CE micro-F1",
                m["CE_micro_F1"],
                random_report["CE_micro_F1"],
                "a random report",
                m["CE_micro_F1"] >= random_report["CE_micro_F1"],
            ),
        ]
        if static:
            checks.append(
                (
                    "CE micro-F1",
                    m["CE_micro_F1"],
                    static["CE_micro_F1"],
                    "static",
                    m["CE_micro_F1"] >= static["CE_micro_F1"],
                )
            )
        parts = [
            f"{metric} {value:.3f} vs {other:.3f} ({who}): {'met' if ok else 'NOT met'}"
            for metric, value, other, who, ok in checks
        ]
        lines.append(f"- {name}: " + "; ".join(parts) + ".")
    return "\n".join(lines)


def naming_a_finding(rows: list[dict], labeler: ReportLabeler) -> float:
    """The share of generated reports in which the labeler finds at least one finding."""
    labels = [labeler.label14(r["generated"]) for r in rows]
    return sum(any(found[f] for f in FINDINGS14) for found in labels) / len(rows)


def image_dependence(rows: list[dict], seed: int = 0) -> dict:
    """How much the report depends on the image: the share of test images whose report
    changes when the image is replaced by another test image (a seeded derangement: greedy
    decoding is deterministic, so that report is the other image's), and distinct reports."""
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    partner = {order[i]: order[(i + 1) % len(order)] for i in range(len(order))}
    changed = sum(rows[i]["generated"] != rows[partner[i]]["generated"] for i in partner)
    return {
        "changed": changed / len(rows),
        "distinct": len({r["generated"] for r in rows}),
    }


@torch.inference_mode()
def blank_image_report(model, decoding, findings_head=None) -> str:
    """The report written for a blank (black) frontal image (from the head's findings on it,
    for a findings-conditioned model)."""
    size, views = model.config.encoder.image_size, model.config.max_views
    mask = torch.zeros(1, views, dtype=torch.bool)
    mask[0, 0] = True
    blank = Views(torch.zeros(1, views, 1, size, size), torch.arange(views).unsqueeze(0), mask)
    uses = model.config.uses_findings
    y = findings_head.predict(blank, model.config.uses_states)[1] if uses else None
    return model.generate(blank, decoding, y)[0]


def head_table(metrics: dict) -> str:
    """Markdown: test AUROC per finding with its 95 % interval, head beside the stem probe."""
    test = metrics["test"]
    lines = [
        "| finding | test positives | findings head AUROC (95 % CI) | frozen-stem probe AUROC (95 % CI) | operating point |",
        "|---|---:|---:|---:|---:|",
    ]

    def cell(kind: str, finding: str) -> str:
        value = test[f"{kind}_auroc"][finding]
        interval = test[f"{kind}_interval"].get(finding)
        if value is None:
            return "n/a"
        return f"{value:.3f}" + (f" ({interval[0]:.2f}–{interval[1]:.2f})" if interval else "")

    for index, finding in enumerate(FINDINGS14):
        lines.append(
            f"| {finding} | {test['positives'][finding]} | {cell('head', finding)} | "
            f"{cell('probe', finding)} | {test['threshold'][index]:.2f} |"
        )
    mean_head, mean_probe = test["head_interval"]["mean"], test["probe_interval"]["mean"]
    lines.append(
        f"| **mean over the {len(test['counted'])} findings with ≥ 5 test positives** | | "
        f"**{test['head_mean_auroc']:.3f}** ({mean_head[0]:.2f}–{mean_head[1]:.2f}) | "
        f"{test['probe_mean_auroc']:.3f} ({mean_probe[0]:.2f}–{mean_probe[1]:.2f}) | |"
    )
    return "\n".join(lines) + "\n"


def fidelity_table(fidelity: dict[str, dict]) -> str:
    """Markdown: label fidelity of each way in (micro, macro, per finding given)."""
    findings = sorted({f for scores in fidelity.values() for f in scores["per_finding"]})
    lines = [
        "| way in | reports | findings given | written | micro-F1 | macro-F1 | "
        + " | ".join(findings)
        + " |",
        "|---|---:|---:|---:|---:|---:|" + "---:|" * len(findings),
    ]
    for way, scores in fidelity.items():
        per = scores["per_finding"]
        lines.append(
            f"| {way} | {scores['reports']} | {scores['given_positives']} | "
            f"{scores['written_positives']} | {scores['micro_f1']:.3f} | {scores['macro_f1']:.3f} | "
            + " | ".join(f"{per[f]:.2f}" if f in per else "–" for f in findings)
            + " |"
        )
    return "\n".join(lines) + "\n"


def dependence_table(dependence: dict[str, dict], results: dict[str, dict]) -> str:
    lines = [
        "| model | reports that change when the image is replaced | distinct reports | reports naming a finding | CE micro-F1, real image | CE micro-F1, blank image |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, d in dependence.items():
        lines.append(
            f"| {name} | {d['changed']:.0%} | {d['distinct']} of {results[name]['studies']} | "
            f"{d['naming_a_finding']:.0%} | "
            f"{results[name]['CE_micro_F1']:.3f} | {d['blank_CE_micro_F1']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def language_losses(records: list[dict]) -> dict[str, float]:
    """Held-out report loss (nats/token) before and after the report-language stage."""
    language = [r for r in records if r.get("stage") == "language" and "val_loss" in r]
    return {"language_before": language[0]["val_loss"], "language_after": language[-1]["val_loss"]}


# The card's YAML header for the Hub: the checkpoints' licence (non-commercial: OpenI's
# CC BY-NC-ND reports, as the card's Licences section says), tags, base model, data, and
# model-index with each shipped mode's test figures (demo_metrics.json key: type, name).
CARD_DATASET = "timm/nih-chest-xray-14"  # the NIH ChestX-ray14 images on the Hub
CARD_HEADLINE = {"CE_micro_F1": ("f1", "CE micro-F1"), "CE_macro_F1": ("f1", "CE macro-F1")}
CARD_HEADLINE.update({"BLEU_4": ("bleu", "BLEU-4"), "CIDEr": ("cider", "CIDEr")})


def card_metadata(metrics: dict) -> str:
    """The model card's YAML header (``---`` … ``---``) from ``demo_metrics.json``'s dict."""
    from huggingface_hub import EvalResult, ModelCardData

    from mrg.hub import SMOLLM2_HUB

    modes, split = list(metrics["checkpoints"]), "NIH ChestX-ray14 test split, {} held-out images"
    results = [
        EvalResult(
            task_type="image-to-text",
            task_name="Chest X-ray report generation",
            dataset_type=CARD_DATASET,
            dataset_name=split.format(metrics["results"][modes[0]]["studies"]),
            dataset_split="test",
            metric_type=kind,
            metric_name=f"{name} ({mode})",
            metric_config=mode,
            metric_value=metrics["results"][mode][key],
        )
        for mode in modes
        for key, (kind, name) in CARD_HEADLINE.items()
    ]
    tags = ["medical-imaging", "radiology", "chest-x-ray", "report-generation", "mrg-llm"]
    data = ModelCardData(
        model_name="mrg demo checkpoints (SmolLM2-135M + hybrid ViT)",
        language="en",
        license="other",
        license_name="non-commercial",
        license_link="https://creativecommons.org/licenses/by-nc-nd/4.0/",
        base_model=SMOLLM2_HUB,
        datasets=[CARD_DATASET],
        pipeline_tag="image-to-text",
        library_name="mrg",
        tags=tags,
        eval_results=results,
    )
    return f"---\n{data.to_yaml()}\n---\n"


def model_card(fields: dict) -> str:
    """``assets/MODEL_CARD.template.md`` with its ``{field}`` placeholders filled (``str.format``)."""
    return MODEL_CARD_TEMPLATE.read_text().format(**fields)
