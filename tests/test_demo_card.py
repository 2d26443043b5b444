"""The measured facts of the demo checkpoints' model card (``mrg.evaluation.demo_card``).

Small synthetic inputs only: no model, no shared data.
"""

from __future__ import annotations

import ast
import json
import string
from pathlib import Path

import pytest

from mrg.data.datasets import StudyRecord
from mrg.evaluation.baselines import baselines, constant_findings_baselines, listed_findings_report
from mrg.evaluation.demo_card import (
    CARD_METRICS,
    MODEL_CARD_TEMPLATE,
    alignment_retrieval,
    best_baseline,
    blank_image_report,
    ceiling_table,
    ceiling_verdict,
    common_report_shift,
    fidelity_table,
    floor_verdict,
    image_dependence,
    language_losses,
    markdown,
    model_card,
    naming_a_finding,
    pair_statistics,
    read_log,
    score,
    training_seconds,
    verdict,
)
from mrg.text.labeler import ReportLabeler
from mrg.text.taxonomy import FINDINGS14

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "build_model_card.py"
CARDIOMEGALY = "The heart is enlarged. Cardiomegaly is present in this chest radiograph today."
EFFUSION = "There is a small right pleural effusion. No pneumothorax is seen on this film."
NORMAL = "The lungs are clear. No acute cardiopulmonary abnormality is seen on this film."


@pytest.fixture(scope="module")
def labeler() -> ReportLabeler:
    return ReportLabeler()


@pytest.fixture()
def test_rows() -> tuple[list[dict], dict[str, list[str]]]:
    """Three studies: cardiomegaly, effusion and a normal image, each with a matching report."""
    image_labels = {"a": ["Cardiomegaly"], "b": ["Effusion"], "c": []}
    assert all(set(labels) <= set(FINDINGS14) for labels in image_labels.values())
    rows = [
        {"id": "a", "reference": CARDIOMEGALY},
        {"id": "b", "reference": EFFUSION},
        {"id": "c", "reference": NORMAL},
    ]
    return rows, image_labels


def metrics(ce_micro_f1: float, studies: int = 3) -> dict:
    return {"studies": studies, **dict.fromkeys(CARD_METRICS, 0.5), "CE_micro_F1": ce_micro_f1}


# ------------------------------------------------------------------------------------- score


def test_score_of_reports_naming_exactly_the_image_labels_is_perfect(test_rows, labeler):
    rows, image_labels = test_rows
    result = score([dict(r, generated=r["reference"]) for r in rows], image_labels, labeler)
    assert result["studies"] == 3
    assert result["CE_micro_P"] == result["CE_micro_R"] == result["CE_micro_F1"] == 1.0
    assert result["CE_macro_F1"] == 1.0
    assert result["normal_accuracy"] == 1.0
    assert result["BLEU_4"] == pytest.approx(1.0, abs=1e-6)
    assert result["CIDEr"] > 1.0


def test_score_of_empty_reports_finds_nothing_and_is_right_only_on_the_normal_image(
    test_rows, labeler
):
    rows, image_labels = test_rows
    result = score([dict(r, generated="") for r in rows], image_labels, labeler)
    assert result["CE_micro_P"] == result["CE_micro_R"] == result["CE_micro_F1"] == 0.0
    assert result["normal_accuracy"] == pytest.approx(1 / 3)
    assert result["BLEU_4"] < 0.01 and result["CIDEr"] < 0.01


def test_score_counts_a_wrong_finding_as_a_false_positive_and_a_miss(test_rows, labeler):
    rows, image_labels = test_rows
    swapped = {"a": EFFUSION, "b": CARDIOMEGALY, "c": NORMAL}
    result = score([dict(r, generated=swapped[r["id"]]) for r in rows], image_labels, labeler)
    assert result["CE_micro_F1"] == 0.0
    assert result["normal_accuracy"] == 1.0


# --------------------------------------------------------------------------------- baselines


def test_most_common_report_baseline_writes_the_mode_of_the_training_reports(test_rows):
    rows, _ = test_rows
    train = [EFFUSION, NORMAL, CARDIOMEGALY, NORMAL, EFFUSION, NORMAL]
    common = baselines(train, rows)["baseline: most common report"]
    assert [r["generated"] for r in common] == [NORMAL] * 3
    assert [(r["id"], r["reference"]) for r in common] == [(r["id"], r["reference"]) for r in rows]
    assert all("generated" not in r for r in rows)  # the test rows are not modified


def test_random_report_baseline_draws_training_reports_reproducibly_by_seed():
    rows = [{"id": str(i), "reference": NORMAL} for i in range(40)]
    train = [f"report {i}" for i in range(10)]
    first = baselines(train, rows, seed=3)["baseline: random training report"]
    again = baselines(train, rows, seed=3)["baseline: random training report"]
    other = baselines(train, rows, seed=4)["baseline: random training report"]
    drawn = [r["generated"] for r in first]
    assert set(drawn) <= set(train) and len(set(drawn)) > 1
    assert drawn == [r["generated"] for r in again]
    assert drawn != [r["generated"] for r in other]


# ---------------------------------------------------------------------------------- markdown


def test_markdown_has_a_header_with_every_metric_and_one_row_per_result():
    results = {
        "prompt-wise": metrics(0.25, studies=7),
        "baseline: most common report": metrics(0.5),
    }
    lines = markdown(results).splitlines()
    assert len(lines) == 2 + len(results)
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    assert header == ["model", "studies", *CARD_METRICS]
    assert set(lines[1]) <= set("|-:")
    assert lines[2].startswith("| prompt-wise | 7 | ") and "| 0.250 |" in lines[2]
    assert lines[3].startswith("| baseline: most common report | 3 | ")


# ----------------------------------------------------------------------- baselines vs modes


def test_best_baseline_is_the_highest_baseline_and_ignores_the_models():
    results = {
        "prompt-wise": metrics(0.9),
        "baseline: most common report": metrics(0.3),
        "baseline: random training report": metrics(0.4),
    }
    assert best_baseline(results) == 0.4


def test_verdict_says_which_modes_beat_the_best_baseline_and_compares_with_static():
    results = {
        "prompt-wise": metrics(0.45),
        "promptbook-wise": metrics(0.35),
        "static": metrics(0.38),
        "baseline: most common report": metrics(0.4),
        "baseline: random training report": metrics(0.1),
    }
    lines = verdict(results).splitlines()
    assert len(lines) == 2  # neither static nor the baselines get a line of their own
    prompt, promptbook = lines
    assert prompt.startswith("- prompt-wise: CE micro-F1 0.450 beats")
    assert "(0.400)" in prompt and "above static (0.380)" in prompt
    assert promptbook.startswith("- promptbook-wise: CE micro-F1 0.350 does NOT beat")
    assert "below static (0.380)" in promptbook


def test_verdict_without_static_does_not_mention_it():
    results = {"prompt-wise": metrics(0.2), "baseline: most common report": metrics(0.3)}
    text = verdict(results)
    assert "does NOT beat the best trivial baseline (0.300)" in text
    assert "static" not in text


# ---------------------------------------------------------------------------- pairs, alignment


def test_pair_statistics_count_reuse_and_the_most_used_report_among_test_references():
    train = ["A", "A", "B", "A", "C"]
    assert pair_statistics(train, ["A", "D", "A"]) == {
        "train_pairs": 5,
        "distinct": 3,
        "max_use": 3,
        "test_same": 2,
    }


def alignment_log(first: float, last: float, chance: float = 0.125) -> list[dict]:
    return [
        {"stage": "language", "epoch": 1, "val_loss": 3.0},
        {"stage": "align", "epoch": 1, "val_retrieval_acc": first, "val_retrieval_chance": chance},
        {"stage": "align", "epoch": 2, "val_retrieval_acc": last, "val_retrieval_chance": chance},
    ]


def test_alignment_retrieval_reports_first_and_last_epoch_and_a_clear_gain_over_chance():
    facts = alignment_retrieval(alignment_log(0.2, 0.4))
    assert facts["retrieval_first"] == "0.200"
    assert facts["retrieval"] == "0.400"
    assert facts["chance"] == "0.125"
    assert "better than chance" in facts["alignment_verdict"]


def test_alignment_retrieval_within_noise_of_chance_says_it_does_not_generalise():
    facts = alignment_retrieval(alignment_log(0.3, 0.15))
    assert facts["retrieval_first"] == "0.300" and facts["retrieval"] == "0.150"
    assert "does not generalise" in facts["alignment_verdict"]


def test_alignment_retrieval_without_alignment_epochs_is_not_available():
    expected = dict.fromkeys(("retrieval_first", "retrieval", "chance", "alignment_verdict"), "n/a")
    assert alignment_retrieval([]) == expected
    assert alignment_retrieval([{"epoch": 1, "val_loss": 2.0}]) == expected


def shift_records() -> tuple[list[StudyRecord], list[StudyRecord]]:
    """Training studies whose most common report says cardiomegaly; two test studies."""

    def record(i: int, report: str, labels: list[str], split: str) -> StudyRecord:
        return StudyRecord(f"s{i}", report, [Path(f"{i}.png")], split, labels=labels)

    train = [
        record(0, CARDIOMEGALY, ["Cardiomegaly"], "train"),
        record(1, CARDIOMEGALY, ["Effusion"], "train"),
        record(2, EFFUSION, ["Effusion"], "train"),
        record(3, NORMAL, [], "train"),
    ]
    test = [record(4, NORMAL, ["Cardiomegaly", "Effusion"], "test"), record(5, NORMAL, [], "test")]
    return train, test


def test_common_report_shift_names_the_findings_of_the_most_common_report(labeler):
    assert common_report_shift(*shift_records(), labeler) == {
        "common_labels": "Cardiomegaly",
        "common_train_share": 0.25,
        "common_test_share": 0.5,
    }


# ----------------------------------------------------------------------------- the ceiling


CEILING = {"probe": {1: 0.2, 2: 0.35, 3: 0.3}, "constant": {1: 0.15, 2: 0.25, 3: 0.28}}


@pytest.mark.parametrize(
    ("best", "expected"),
    [
        (0.1, "only when it names at least 1 finding per image."),
        (0.3, "only when it names at least 2 findings per image."),
        (0.35, "Not even the probe reaches the best trivial baseline (0.350) for any k."),
    ],
)
def test_ceiling_verdict_names_the_fewest_findings_with_which_the_probe_beats_the_baseline(
    best, expected
):
    results = {"prompt-wise": metrics(0.9), "baseline: most common report": metrics(best)}
    assert ceiling_verdict(CEILING, results).endswith(expected)


def test_ceiling_table_has_one_column_per_k_and_the_probe_and_constant_rows():
    lines = ceiling_table(CEILING).splitlines()
    assert len(lines) == 4
    assert lines[0] == "| findings named per image | k = 1 | k = 2 | k = 3 |"
    assert lines[1] == "|---|---:|---:|---:|"
    assert lines[2].startswith("| linear probe") and lines[2].endswith("| 0.200 | 0.350 | 0.300 |")
    assert lines[3].startswith("| the k findings most frequent")
    assert lines[3].endswith("| 0.150 | 0.250 | 0.280 |")


# ----------------------------------------------------------------------------- training log


def test_read_log_returns_each_epoch_record_and_nothing_for_a_run_not_started(tmp_path):
    assert read_log(tmp_path / "missing" / "log.jsonl") == []
    records = [{"epoch": 1, "epoch_seconds": 12.5}, {"epoch": 2, "epoch_seconds": 7.5}]
    log_file = tmp_path / "log.jsonl"
    log_file.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert read_log(log_file) == records


def test_training_seconds_sums_the_epochs_and_counts_records_without_timing_as_zero():
    records = [
        {"epoch": 1, "epoch_seconds": 12.5},
        {"epoch": 2},
        {"epoch": 3, "epoch_seconds": 7.5},
    ]
    assert training_seconds(records) == 20.0
    assert training_seconds([]) == 0.0


# ------------------------------------------------------------------------------ model card


def template_fields() -> dict[str, str]:
    """The template's placeholders and their format specs."""
    parsed = string.Formatter().parse(MODEL_CARD_TEMPLATE.read_text())
    return {name: spec for _, name, spec, _ in parsed if name}


def test_model_card_fills_every_placeholder_of_the_template():
    fields = template_fields()
    assert {"shipped", "table", "verdict", "ceiling_table", "alignment_verdict"} <= set(fields)
    # Numbers where the template formats them (":g", ":.0%", ":.1f"), otherwise the name itself.
    values = {name: 0.25 if spec else name for name, spec in fields.items()}
    card = model_card(values)
    assert "{" not in card and "}" not in card
    assert card.startswith("# Model card")
    assert "for shipped: ViT blocks" in card
    assert "{ceiling_table}" not in card and "\nceiling_table\n" in card
    assert "present in\n25% of the test images" in card


def test_model_card_refuses_a_missing_field():
    values = dict.fromkeys(template_fields(), 1.0)
    del values["verdict"]
    with pytest.raises(KeyError, match="verdict"):
        model_card(values)


def test_the_build_script_passes_exactly_the_template_fields(labeler):
    """The keywords of the script's ``model_card(dict(...))`` call plus the facts it unpacks."""
    calls = [
        node
        for node in ast.walk(ast.parse(SCRIPT.read_text()))
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "model_card"
    ]
    assert len(calls) == 1
    (argument,) = calls[0].args
    keywords = {k.arg for k in argument.keywords if k.arg}
    unpacked = {k.value.func.id for k in argument.keywords if k.arg is None}
    assert unpacked == {
        "alignment_retrieval",
        "pair_statistics",
        "common_report_shift",
        "language_losses",
    }
    facts = {
        *alignment_retrieval([]),
        *language_losses([{"stage": "language", "val_loss": 3.0}]),
        *pair_statistics(["A"], ["A"]),
        *common_report_shift(*shift_records(), labeler),
    }
    assert keywords.isdisjoint(facts)
    assert keywords | facts == set(template_fields())


def test_image_dependence_counts_images_whose_report_is_another_images():
    same = [{"generated": "FINDINGS: a.\nIMPRESSION: b."}] * 4
    assert image_dependence(same) == {"changed": 0.0, "distinct": 1}
    different = [{"generated": f"report {i}"} for i in range(4)]
    assert image_dependence(different) == {"changed": 1.0, "distinct": 4}


def test_floor_verdict_checks_bleu_cider_against_a_random_report_and_ce_against_static():
    def metrics(bleu, cider, ce):
        return {"BLEU_4": bleu, "CIDEr": cider, "CE_micro_F1": ce}

    results = {
        "prompt-wise": metrics(0.10, 0.30, 0.12),
        "promptbook-wise": metrics(0.05, 0.30, 0.12),
        "static": metrics(0.10, 0.30, 0.13),
        "baseline: random training report": metrics(0.08, 0.20, 0.10),
    }
    lines = floor_verdict(results).splitlines()
    assert len(lines) == 2  # the customized modes only
    assert "BLEU-4 0.100 vs 0.080 (a random report): met" in lines[0]
    assert "BLEU-4 0.050 vs 0.080 (a random report): NOT met" in lines[1]
    assert all("CE micro-F1 0.120 vs 0.130 (static): NOT met" in line for line in lines)


def test_language_losses_are_the_stage_s_first_and_last_validation():
    records = [
        {"stage": "language", "epoch": 0, "val_loss": 3.6},
        {"stage": "language", "epoch": 1, "val_loss": 2.4},
        {"stage": "align", "epoch": 1, "val_loss": 2.0},
    ]
    assert language_losses(records) == {"language_before": 3.6, "language_after": 2.4}


def test_a_blank_image_gets_a_well_formed_report(make_tiny_model):
    from mrg.config import Decoding
    from mrg.evaluation.text_quality import well_formed

    model = make_tiny_model("prompt-wise").eval()
    assert well_formed(blank_image_report(model, Decoding(max_new_tokens=30)))


def test_verdict_says_equal_when_a_mode_ties_static():
    results = {
        "prompt-wise": metrics(0.0),
        "static": metrics(0.0),
        "baseline: random training report": metrics(0.1),
    }
    assert "equal to static (0.000)" in verdict(results)


def test_naming_a_finding_counts_reports_with_any_labeler_finding(labeler):
    rows = [
        {"generated": "FINDINGS: Large right pleural effusion.\nIMPRESSION: Effusion."},
        {"generated": "FINDINGS: The lungs are clear.\nIMPRESSION: No acute disease."},
    ]
    assert naming_a_finding(rows, labeler) == 0.5


def test_cached_generations_never_outlive_their_checkpoint_or_decoding(tmp_path):
    """The card resumes generation from its file, but only for the same weights and decoding."""
    import dataclasses
    import importlib.util

    from mrg.config import DEFAULT_DECODING

    spec = importlib.util.spec_from_file_location("build_model_card", SCRIPT)
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    best, rows = tmp_path / "best", tmp_path / "test_generations.jsonl"
    best.mkdir()
    (best / "model.safetensors").write_bytes(b"epoch 1")
    key = lambda decoding=DEFAULT_DECODING: build.checkpoint_key(best, decoding)
    rows.write_text('{"id": "from before any stamp"}\n')
    assert build.cached(rows, *key()) == rows and not rows.exists()  # unknown origin
    rows.write_text('{"id": "a"}\n')  # generated by epoch 1, then interrupted
    build.cached(rows, *key())
    assert rows.read_text() == '{"id": "a"}\n'  # same weights: resumed
    build.cached(rows, *key(dataclasses.replace(DEFAULT_DECODING, closed_vocabulary=False)))
    assert not rows.exists()  # another decoding
    rows.write_text('{"id": "a"}\n')
    build.cached(rows, *key())
    (best / "model.safetensors").write_bytes(b"epoch 3")  # retrained
    build.cached(rows, *key())
    assert not rows.exists()


def test_constant_findings_baselines_name_the_most_frequent_findings(labeler):
    train = [["Effusion"], ["Effusion", "Mass"], ["Mass"], ["Effusion"], []]
    rows = [{"id": "a", "reference": "r"}]
    found = constant_findings_baselines(train, rows, ks=(1, 2))
    (top1,) = [v for k, v in found.items() if "top 1" in k]
    (top2,) = [v for k, v in found.items() if "top 2" in k]
    assert [f for f, v in labeler.label14(top1[0]["generated"]).items() if v] == ["Effusion"]
    assert {f for f, v in labeler.label14(top2[0]["generated"]).items() if v} == {
        "Effusion",
        "Mass",
    }
    assert listed_findings_report([]).startswith("FINDINGS: No acute findings.")


def test_fidelity_table_has_a_row_per_way_and_a_column_per_finding_given():
    scores = {
        "words": {
            "reports": 3,
            "given_positives": 2,
            "written_positives": 2,
            "micro_f1": 1.0,
            "macro_f1": 1.0,
            "per_finding": {"Mass": 1.0},
        },
        "affine": {
            "reports": 3,
            "given_positives": 2,
            "written_positives": 0,
            "micro_f1": 0.0,
            "macro_f1": 0.0,
            "per_finding": {"Edema": 0.0},
        },
    }
    table = fidelity_table(scores)
    assert "| words | 3 | 2 | 2 | 1.000 | 1.000 | – | 1.00 |" in table
    assert "| affine | 3 | 2 | 0 | 0.000 | 0.000 | 0.00 | – |" in table


def test_text_floors_count_prior_study_claims_and_contradictions(labeler):
    from collections import Counter

    from mrg.evaluation.text_quality import text_quality

    texts = [
        "FINDINGS: No pleural effusion. Small pleural effusion.\nIMPRESSION: Effusion.",
        "FINDINGS: Heart size is stable.\nIMPRESSION: Unchanged from prior.",
        "FINDINGS: The lungs are clear.\nIMPRESSION: No acute disease.",
    ]
    quality = text_quality(texts, Counter(), labeler=labeler)
    assert quality.contradictions == 1 and quality.prior_comparisons == 1
