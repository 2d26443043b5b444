"""What a newcomer reads: the README (short, the Space's front matter, links that resolve, its
figures from the measured files), the documentation site (builds with --strict) and the model
card's Hub metadata (parsed by huggingface_hub, its model-index equal to demo_metrics.json).

No model and no network: the card is parsed from the file, never validated against the Hub.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
ASSETS = ROOT / "assets"
CARD = ASSETS / "MODEL_CARD.md"
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n", 2)[1])


def slug(heading: str) -> str:
    """The anchor GitHub and MkDocs both give a heading like these (ASCII words, code)."""
    text = re.sub(r"[^\w\s-]", "", heading.strip().lower())
    return re.sub(r"\s+", "-", text)


def anchors(page: Path) -> set[str]:
    fenced, found = False, set()
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and line.startswith("#"):
            found.add(slug(line.lstrip("#")))
    return found


def demo_metrics() -> dict:
    return json.loads((ASSETS / "demo_metrics.json").read_text())


# ------------------------------------------------------------------------------------ README


def test_readme_is_short_and_keeps_the_space_front_matter():
    text = README.read_text()
    assert len(text.splitlines()) <= 250
    space = front_matter(text)
    assert space["sdk"] == "gradio" and space["app_file"] == "app.py"
    assert space["license"] == "apache-2.0" and "chest-x-ray" in space["tags"]
    top = "\n".join(text.splitlines()[:60])
    assert "make demo" in top and "make test" in top
    assert "Generated reports are not for diagnosis." in top


@pytest.mark.parametrize("source", [README, *sorted(DOCS.glob("*.md"))], ids=lambda p: p.name)
def test_every_relative_link_resolves(source):
    """Files and headings; the docs pages' links are checked again by mkdocs --strict."""
    body = source.read_text()
    for target in LINK.findall(body):
        if re.match(r"[a-z]+:", target):
            continue  # https:, mailto:
        path, _, anchor = target.partition("#")
        page = (source.parent / path).resolve() if path else source
        assert page.exists(), f"{source.name}: {target}"
        if anchor and page.suffix == ".md":
            assert anchor in anchors(page), f"{source.name}: {target}"


def test_readme_headline_figures_are_the_measured_ones():
    text = README.read_text()
    results = demo_metrics()["results"]
    pw, pb = results["prompt-wise"], results["promptbook-wise"]
    assert f"| {pw['CE_micro_F1']:.3f} / {pb['CE_micro_F1']:.3f} |" in text
    image_free = max(
        r["CE_micro_F1"] for name, r in results.items() if name.startswith("baseline:")
    )
    assert f"| {image_free:.3f} |" in text
    assert f"| {pw['BLEU_4']:.3f} / {pw['CIDEr']:.3f} |" in text
    random = results["baseline: random training report"]
    assert f"{random['BLEU_4']:.3f} / {random['CIDEr']:.3f}" in text
    head = json.loads((ASSETS / "findings_metrics.json").read_text())["test"]
    assert f"| {head['head_mean_auroc']:.3f} |" in text
    assert f"{head['probe_mean_auroc']:.3f}" in text


def test_the_readme_s_cross_validation_table_is_the_measured_one():
    from mrg.evaluation.findings_card import cv_brief

    record = json.loads((ASSETS / "findings_cv.json").read_text())
    assert cv_brief(record) in README.read_text()
    assert (ASSETS / "findings_cv.png").is_file() and "assets/findings_cv.png" in README.read_text()


# -------------------------------------------------------------------------------------- docs


def test_every_docs_page_is_in_the_site_s_navigation():
    config = (ROOT / "mkdocs.yml").read_text()
    in_nav = set(re.findall(r":\s+(\S+\.md)\s*$", config, re.MULTILINE))
    assert in_nav == {p.name for p in DOCS.glob("*.md")}


def test_the_gate_page_s_table_is_the_measured_one():
    spec = importlib.util.spec_from_file_location("build_gate", ROOT / "scripts" / "build_gate.py")
    build_gate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build_gate)
    metrics = json.loads((ASSETS / "gate_metrics.json").read_text())
    page = (DOCS / "gate.md").read_text()
    assert build_gate.markdown_table(metrics["rows"]) in page
    assert f"is above {metrics['thresholds']['max_distance']}." in page


def test_the_gallery_lives_where_its_script_writes_it():
    text = (ROOT / "scripts" / "examples_gallery.py").read_text()
    assert '"docs" / "checkpoints.md"' in text
    page = (DOCS / "checkpoints.md").read_text()
    assert page.count("<!-- gallery:begin -->") == page.count("<!-- gallery:end -->") == 1


def test_mkdocs_builds_the_site_strictly(tmp_path):
    """A broken link, a missing anchor or a page left out of the navigation fails the build."""
    for module in ("mkdocs", "material", "mkdocstrings"):  # the dev extra installs all three
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed (pip install -e '.[dev]')")
    site = tmp_path / "site"
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT,
        check=False,
        capture_output=True,
        text=True,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    api = (site / "api" / "index.html").read_text()
    assert "mrg.service.report_service.ReportService" in api and "card_metadata" in api
    assert (site / "images" / "reading-room.png").is_file()


# -------------------------------------------------------------------------------- model card


def test_the_model_card_s_metadata_is_parsed_by_huggingface_hub():
    from huggingface_hub import ModelCard

    card = ModelCard.load(CARD)
    data = card.data
    assert data.license == "other" and "by-nc-nd" in data.license_link
    assert data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert data.pipeline_tag == "image-to-text"
    assert {"medical-imaging", "radiology", "chest-x-ray", "report-generation"} <= set(data.tags)
    assert data.datasets and data.model_name
    assert card.text.lstrip().startswith("# Model card")


def test_the_model_index_equals_demo_metrics():
    from huggingface_hub import ModelCard
    from huggingface_hub.repocard_data import model_index_to_eval_results

    from mrg.evaluation.demo_card import CARD_HEADLINE

    metadata = front_matter(CARD.read_text())
    name, results = model_index_to_eval_results(metadata["model-index"])
    assert name == ModelCard.load(CARD).data.model_name
    measured = demo_metrics()
    names = {label: key for key, (_, label) in CARD_HEADLINE.items()}
    seen = set()
    for result in results:
        assert result.task_type == "image-to-text" and result.dataset_split == "test"
        label = result.metric_name.removesuffix(f" ({result.metric_config})")
        key = names[label]
        assert result.metric_value == measured["results"][result.metric_config][key]
        seen.add((result.metric_config, key))
    assert seen == {(mode, key) for mode in measured["checkpoints"] for key in CARD_HEADLINE}
    assert all(f"{len(measured['test_images'])} held-out images" in r.dataset_name for r in results)


def test_the_card_s_header_is_what_build_model_card_writes():
    from mrg.evaluation.demo_card import card_metadata

    header = card_metadata(demo_metrics())
    assert CARD.read_text().startswith(header)
    assert "{" not in header  # the card test's check that every template field was filled


def test_a_card_with_its_own_metadata_is_uploaded_as_the_readme(tmp_path, monkeypatch):
    """``push_to_hub`` and ``MRGModel.push_to_hub`` send the shipped card as it is (a stub
    stands in for the Hub)."""
    import huggingface_hub

    from mrg.hub import hub_model_card, push_to_hub

    card = CARD.read_text()
    assert hub_model_card("org/mrg-demo", ["prompt-wise"], "base", card) == card
    assert hub_model_card("org/x", ["prompt-wise"], "base", "Body.").startswith("---\nlicense:")
    folder = tmp_path / "checkpoints"
    (folder / "prompt-wise").mkdir(parents=True)
    (folder / "prompt-wise" / "mrg_config.json").write_text("{}")
    (folder / "prompt-wise" / "model.safetensors").write_bytes(b"weights")
    sent = {}

    def create_commit(self, repo_id, operations, commit_message):
        sent.update({op.path_in_repo: op.path_or_fileobj for op in operations})
        return type("Commit", (), {"commit_url": f"https://huggingface.co/{repo_id}/commit/1"})

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda self, *a, **k: None)
    monkeypatch.setattr(huggingface_hub.HfApi, "create_commit", create_commit)
    push_to_hub(folder, "org/mrg-demo", card)
    assert sent["README.md"] == card.encode()
    assert set(sent) == {
        "README.md",
        "prompt-wise/mrg_config.json",
        "prompt-wise/model.safetensors",
    }
