"""The mrg command on tiny checkpoints: info-free paths that must work end to end."""

import csv
import json

import pytest
from conftest import save_tiny_checkpoints, shared_path
from pydicom.data import get_testdata_file

from mrg.cli import main
from mrg.model.llm import bitsandbytes_device


@pytest.fixture
def checkpoints(tiny_llm, tokenizer, tmp_path):
    return save_tiny_checkpoints(tmp_path, tiny_llm, tokenizer)


@pytest.mark.parametrize("quantization", ["none", "nf4"])
def test_generate_json_for_a_dicom(checkpoints, capsys, quantization):
    dicom = get_testdata_file("RG1_UNCI.dcm")
    argv = f"generate {dicom} --checkpoints {checkpoints} --json --max-new-tokens 6"
    code = main(argv.split() + ["--mode", "promptbook-wise", "--quantization", quantization])
    assert code == 0
    out = capsys.readouterr().out
    payload = json.loads(out[out.index("{") :])
    assert payload["mode"] == "promptbook-wise" and payload["tokens"] >= 1
    in_effect = "nf4" if quantization == "nf4" and bitsandbytes_device() else "none"
    assert (payload["device"], payload["quantization"]) == ("cpu", in_effect)
    view = payload["views"][0]
    assert view["format"] == "dicom" and view["position"] == "frontal"
    assert "CompressedSamples" not in out  # the file's patient name never reaches the output


def test_generate_refuses_a_bad_file_clearly(checkpoints, tmp_path, capsys):
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    assert main(["generate", str(bad), "--checkpoints", str(checkpoints)]) == 1
    assert "not a PNG, JPEG or DICOM" in capsys.readouterr().out


def test_generate_a_split_is_resumable(checkpoints, tmp_path):
    out = tmp_path / "gen.csv"
    annotation = shared_path("iu_xray", "annotation_sample.json")
    images = shared_path("iu_xray", "images")
    argv = f"generate --annotation {annotation} --images {images} --checkpoints {checkpoints}"
    args = [*argv.split(), "--out", str(out), "--max-new-tokens", "4"]
    assert main(args) == 0
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 3 and rows[0]["reference"]
    assert main(args) == 0
    assert len(out.with_suffix(".jsonl").read_text().splitlines()) == 3  # nothing generated twice


def test_evaluate_compares_two_checkpoints(checkpoints, tmp_path):
    out = tmp_path / "eval"
    code = main(
        [
            "evaluate",
            "--checkpoint",
            str(checkpoints / "prompt-wise"),
            "--checkpoint",
            str(checkpoints / "promptbook-wise"),
            "--annotation",
            str(shared_path("iu_xray", "annotation_sample.json")),
            "--images",
            str(shared_path("iu_xray", "images")),
            "--out",
            str(out),
            "--no-meteor",
            "--max-new-tokens",
            "5",
            "--num-beams",
            "2",
        ]
    )
    assert code == 0
    for name in ("prompt-wise", "promptbook-wise"):
        metrics = json.loads((out / name / "metrics.json").read_text())
        assert (
            metrics["studies"] == 3 and "BLEU_4" in metrics and "CE_chexpert5_micro_f1" in metrics
        )
        cases = list(csv.DictReader((out / name / "cases.csv").open()))
        assert {"id", "reference", "generated", "BLEU_4", "missed", "hallucinated"} <= set(cases[0])
    table = (out / "comparison.md").read_text()
    assert "| prompt-wise | 3 |" in table and "| promptbook-wise | 3 |" in table


def test_train_rejects_a_bad_field_before_loading(capsys):
    assert main(["train", "--set", "batch_size=0"]) == 2
    assert "batch_size" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("generate.epoch=3", "generate has no field 'epoch' (epochs, lr)"),
        ("batchsize=4", "the training config has no field 'batchsize'"),
        ("batch_size.x=1", "batch_size has no field 'x' (none: it is not a section)"),
    ],
)
def test_a_mistyped_set_path_names_the_field_and_the_choices(capsys, override, message):
    assert main(["train", "--set", override]) == 2
    assert message in capsys.readouterr().out


def test_demo_subcommand_passes_its_flags_to_the_app(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--help"])
    assert exit_info.value.code == 0
    assert "--dataset-annotation" in capsys.readouterr().out


def test_generate_a_folder_writes_one_row_per_image(checkpoints, tmp_path):
    from mrg.ui import SHIPPED_EXAMPLES

    out = tmp_path / "folder.csv"
    argv = f"generate {SHIPPED_EXAMPLES} --checkpoints {checkpoints} --out {out} --max-new-tokens 4"
    assert main(argv.split()) == 0
    rows = list(csv.DictReader(out.open()))
    names = sorted(p.stem for p in SHIPPED_EXAMPLES.glob("*.png"))
    assert [r["id"] for r in rows] == names  # manifest.json is not a case
    assert all(r["generated"].startswith("FINDINGS:") for r in rows)
