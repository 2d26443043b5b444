"""Multi-stage training with a tiny random LLaMA on four synthetic studies (CPU, seconds)."""

import json

import numpy as np
import pytest
import torch
from conftest import tiny_model_config
from PIL import Image
from safetensors.torch import load_file

from mrg.config import ConfigError
from mrg.data.datasets import load_annotation
from mrg.model import Decoding, MRGModel
from mrg.train.config import StageConfig, TrainConfig, train_preset
from mrg.train.losses import (
    ContrastiveHeads,
    ReportLabels,
    label_similarity,
    retrieval_accuracy,
    retrieval_chance,
)
from mrg.train.trainer import Trainer

REPORTS = [
    "FINDINGS: The heart is normal. IMPRESSION: Normal chest.",
    "FINDINGS: Large right pleural effusion. IMPRESSION: Effusion.",
    "FINDINGS: Left upper lobe mass. IMPRESSION: Mass.",
    "FINDINGS: Cardiomegaly with edema. IMPRESSION: Heart failure.",
]


@pytest.fixture
def four_studies(tmp_path):
    """Four studies whose frontal images differ (a bright block in a different quadrant)."""
    entries = []
    for i, report in enumerate(REPORTS):
        folder = tmp_path / "images" / f"S{i}"
        folder.mkdir(parents=True)
        image = np.full((64, 64), 40, np.uint8)
        r, c = divmod(i, 2)
        image[r * 32 : r * 32 + 32, c * 32 : c * 32 + 32] = 230
        Image.fromarray(image).save(folder / "0.png")
        entries.append({"id": f"S{i}", "report": report, "image_path": [f"S{i}/0.png"]})
    annotation = {"train": entries, "val": entries, "test": []}
    path = tmp_path / "annotation.json"
    path.write_text(json.dumps(annotation))
    return path, tmp_path / "images"


def make_config(tmp_path, annotation, images, **overrides):
    model = tiny_model_config()
    model.max_views = 1
    values = {
        "model": model,
        "annotation": str(annotation),
        "image_root": str(images),
        "output_dir": str(tmp_path / "run"),
        "align": StageConfig(0, 1e-3),
        "generate": StageConfig(1, 1e-3),
        "batch_size": 2,
        "val_max_studies": 2,
        "val_max_new_tokens": 4,
        "warmup_ratio": 0.0,
    }
    values.update(overrides)
    return TrainConfig(**values)


def records(annotation, images, split):
    return load_annotation(annotation, images, split=split)


def build(tiny_llm, tokenizer, config, seed=0):
    torch.manual_seed(seed)
    return MRGModel(config.model, tiny_llm, tokenizer)


def test_two_step_run_writes_a_loadable_checkpoint(tmp_path, four_studies, tiny_llm, tokenizer):
    annotation, images = four_studies
    config = make_config(tmp_path, annotation, images, max_steps_per_epoch=2)
    model = build(tiny_llm, tokenizer, config)
    result = Trainer(
        config, model, records(annotation, images, "train"), records(annotation, images, "val")
    ).fit()
    assert result.best_dir and (result.best_dir / "model.safetensors").is_file()
    assert (result.last_dir / "trainer_state.pt").is_file()
    loaded = MRGModel.from_pretrained(result.best_dir, llm=tiny_llm, tokenizer=tokenizer)
    assert loaded.mode == "prompt-wise"
    lines = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert lines[-1]["stage"] == "generate" and lines[-1]["step"] == 2
    last = lines[-1]
    assert {"val_loss", "val_bleu4", "val_cider", "val_ce_f1", "samples_per_s"} <= set(last)
    # Findings count as much as wording in the choice of "best".
    assert last["score"] == pytest.approx(
        (last["val_bleu4"] + last["val_cider"] + last["val_ce_f1"]) / 3
    )


def test_resume_equals_uninterrupted(tmp_path, four_studies, tiny_llm, tokenizer):
    annotation, images = four_studies
    stages = {"align": StageConfig(1, 1e-3), "generate": StageConfig(2, 1e-3)}
    train, val = records(annotation, images, "train"), records(annotation, images, "val")

    full = make_config(tmp_path / "a", annotation, images, **stages)
    Trainer(full, build(tiny_llm, tokenizer, full), train, val).fit()

    part = make_config(tmp_path / "b", annotation, images, **stages)
    killed = Trainer(part, build(tiny_llm, tokenizer, part), train, val, stop_after_epochs=2)
    killed.fit()  # stops after two epochs, as a killed run would
    state = torch.load(tmp_path / "b" / "run" / "last" / "trainer_state.pt", weights_only=False)
    assert state["position"] == {"stage": 2, "epoch": 1, "step": 2}
    fresh = build(
        tiny_llm, tokenizer, part, seed=123
    )  # different init: everything must come from the checkpoint
    Trainer(part, fresh, train, val, resume=True).fit()

    expected = load_file(tmp_path / "a" / "run" / "last" / "model.safetensors")
    resumed = load_file(tmp_path / "b" / "run" / "last" / "model.safetensors")
    assert expected.keys() == resumed.keys()
    for key in expected:
        torch.testing.assert_close(resumed[key], expected[key], rtol=1e-5, atol=1e-6)


def test_generation_stage_overfits_four_studies(tmp_path, four_studies, tiny_llm, tokenizer):
    annotation, images = four_studies
    config = make_config(
        tmp_path,
        annotation,
        images,
        generate=StageConfig(80, 6e-3),
        batch_size=4,
        val_max_studies=0,
        max_grad_norm=10.0,
    )
    config.model.customizer.prompt_length = 16  # more prefix to steer a frozen random 2-layer LM
    model = build(tiny_llm, tokenizer, config)
    result = Trainer(config, model, records(annotation, images, "train"), []).fit()
    losses = [h["train_loss"] for h in result.history]
    assert losses[-1] < 0.5 * losses[0], losses


def test_alignment_raises_retrieval_above_chance(tmp_path, four_studies, tiny_llm, tokenizer):
    annotation, images = four_studies
    config = make_config(
        tmp_path,
        annotation,
        images,
        align=StageConfig(25, 3e-3),
        generate=StageConfig(0, 1e-3),
        batch_size=4,
    )
    model = build(tiny_llm, tokenizer, config)
    result = Trainer(
        config, model, records(annotation, images, "train"), records(annotation, images, "val")
    ).fit()
    accuracy = [h["val_retrieval_acc"] for h in result.history]
    assert accuracy[-1] >= 0.75, accuracy  # chance is 1/4
    assert result.history[-1]["val_loss"] < result.history[0]["val_loss"]


def test_bad_configs_fail_before_loading(tmp_path):
    with pytest.raises(ConfigError, match="annotation"):
        TrainConfig(annotation=str(tmp_path / "missing.json")).validate()
    with pytest.raises(ConfigError, match="every stage has 0 epochs"):
        TrainConfig(align=StageConfig(0), generate=StageConfig(0)).validate()
    with pytest.raises(ConfigError, match="batch_size"):
        TrainConfig(batch_size=0).validate()
    with pytest.raises(ConfigError, match="unknown config field"):
        TrainConfig.from_dict({"learning_rate": 1})
    with pytest.raises(ConfigError, match="customizer.mode"):
        train_preset("demo-cpu", mode="bogus")


def test_presets_follow_r2gengpt():
    iu = train_preset("iu-xray-llama2-7b-nf4")
    assert (iu.generate.lr, iu.generate.epochs, iu.batch_size, iu.model.max_report_tokens) == (
        1e-4,
        15,
        8,
        60,
    )
    mimic = train_preset("mimic-cxr-llama2-7b-nf4")
    assert (mimic.generate.epochs, mimic.model.max_report_tokens, mimic.model.llm.quantization) == (
        5,
        100,
        "nf4",
    )
    demo = train_preset("demo-cpu", mode="promptbook-wise")
    assert demo.model.llm.source == "smollm2" and demo.model.customizer.mode == "promptbook-wise"


def test_label_similarity_makes_reports_with_the_same_labels_positives():
    normal, effusion = frozenset({"normal"}), frozenset({"Effusion"})
    both = frozenset({"Effusion", "Atelectasis"})
    similarity = label_similarity([normal, effusion, normal, both])
    assert similarity[0, 2] == similarity[2, 0] == 1.0
    assert similarity[0, 1] == 0.0 and similarity[1, 3] == 0.5
    assert torch.equal(similarity.diagonal(), torch.ones(4))
    # Distinct labels everywhere: exactly CLIP's identity targets.
    distinct = label_similarity([normal, effusion, frozenset({"Mass"})])
    assert torch.equal(distinct, torch.eye(3))
    logits = torch.randn(3, 3)
    assert torch.allclose(ContrastiveHeads.loss(logits, distinct), ContrastiveHeads.loss(logits))


def test_label_aware_loss_does_not_push_apart_two_normal_studies():
    """Images 0 and 1 are both normal: retrieving each other's report is right, not a miss."""
    similarity = label_similarity([frozenset({"normal"})] * 2 + [frozenset({"Mass"})])
    swapped = torch.tensor([[0.0, 5.0, -5.0], [5.0, 0.0, -5.0], [-5.0, -5.0, 5.0]])
    assert retrieval_accuracy(swapped) == pytest.approx(1 / 3)
    assert retrieval_accuracy(swapped, similarity) == 1.0
    assert retrieval_chance(similarity) == pytest.approx(5 / 9)
    assert ContrastiveHeads.loss(swapped, similarity) < ContrastiveHeads.loss(swapped)


def test_report_labels_are_the_labelers_sets():
    labels = ReportLabels()
    assert labels(REPORTS) == [
        frozenset({"normal"}),
        frozenset({"Effusion"}),
        frozenset({"Mass"}),
        frozenset({"Cardiomegaly", "Edema"}),
    ]


def test_encoder_lr_is_scaled_in_the_generation_stage(tmp_path, four_studies, tiny_llm, tokenizer):
    annotation, images = four_studies
    config = make_config(tmp_path, annotation, images, encoder_lr_scale=0.1)
    model = build(tiny_llm, tokenizer, config)
    trainer = Trainer(config, model, records(annotation, images, "train"), [])
    optimizer, _ = trainer._optimizer("generate", config.generate)
    encoder = {id(p) for p in model.encoder.parameters()}
    for group in optimizer.param_groups:
        expected = 1e-4 if id(group["params"][0]) in encoder else 1e-3
        assert group["initial_lr"] == pytest.approx(expected)
    optimizer, _ = trainer._optimizer("align", StageConfig(1, 1e-3))
    assert all(g["initial_lr"] == pytest.approx(1e-3) for g in optimizer.param_groups)


def test_no_weight_decay_on_norms_biases_prompts_book_keys_and_temperature(
    tmp_path, four_studies, tiny_llm, tokenizer
):
    annotation, images = four_studies
    config = make_config(tmp_path, annotation, images, weight_decay=0.05)
    config.model.customizer.mode = "promptbook-wise"
    model = build(tiny_llm, tokenizer, config)
    trainer = Trainer(config, model, records(annotation, images, "train"), [])
    names = {id(p): n for n, p in trainer.unwrapped.named_parameters()}
    decay = {}
    for stage in ("generate", "joint"):
        optimizer, _ = trainer._optimizer(stage, StageConfig(1, 1e-3))
        for group in optimizer.param_groups:
            decay.update({names[id(p)]: group["weight_decay"] for p in group["params"]})
    never = [
        n for n in decay if n.endswith((".bias", "norm.weight", "book", "keys", "logit_scale"))
    ]
    never += [
        n
        for n in decay
        if n.startswith("model.encoder.") and n.endswith(("pos_embed", "cls_token"))
    ]
    assert "heads.logit_scale" in never and "model.customizer.book" in never
    assert all(decay[n] == 0.0 for n in never)
    assert decay["model.projection.0.weight"] == 0.05


def test_language_stage_trains_only_the_plain_prompt_and_lowers_the_report_loss(
    tmp_path, four_studies, tiny_llm, tokenizer
):
    from mrg.data.language import ReportCorpus

    annotation, images = four_studies
    config = make_config(
        tmp_path,
        annotation,
        images,
        language=StageConfig(4, 3e-2),
        generate=StageConfig(0, 1e-3),
        language_reports=str(annotation),  # any existing path: the corpus is passed below
    )
    config.model.customizer.mode = "promptbook-wise"
    model = build(tiny_llm, tokenizer, config)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    corpus = ReportCorpus(train=REPORTS * 2, val=REPORTS[:2], held_out=0)
    result = Trainer(config, model, records(annotation, images, "train"), [], language=corpus).fit()

    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {"customizer.book"}  # LLM, encoder, projection, keys, affine heads untouched
    book = model.customizer.book
    assert torch.equal(book, book[:1].expand_as(book))  # the pages stay equal: P' = P still
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [0, 1, 2, 3, 4]  # the held-out loss before, then per epoch
    assert log[-1]["val_loss"] < log[0]["val_loss"]
    assert result.best_dir is None  # the language stage alone writes no report from an image


def test_language_stage_needs_report_texts(tmp_path, four_studies, tiny_llm, tokenizer):
    annotation, images = four_studies
    config = make_config(tmp_path, annotation, images, language=StageConfig(1, 1e-3))
    with pytest.raises(ConfigError, match="language"):
        Trainer(config, build(tiny_llm, tokenizer, config), records(annotation, images, "train"))


def test_a_language_prompt_starts_any_mode_at_the_same_prompt(tiny_llm, tokenizer):
    from conftest import random_batch

    prompt = torch.randn(4, tiny_llm.config.hidden_size)
    for mode in ("static", "prompt-wise", "promptbook-wise"):
        torch.manual_seed(1)
        model = MRGModel(tiny_model_config(mode), tiny_llm, tokenizer)
        model.customizer.set_plain_prompt(prompt)
        views = random_batch(2)
        ctx = model.context(views)
        assert torch.allclose(ctx.prompt.tokens, prompt.expand(2, -1, -1), atol=1e-6), mode


def test_max_steps_per_epoch_caps_every_epoch(tmp_path, four_studies, tiny_llm, tokenizer):
    annotation, images = four_studies
    config = make_config(
        tmp_path,
        annotation,
        images,
        generate=StageConfig(2, 1e-3),
        batch_size=1,
        max_steps_per_epoch=2,
    )
    train = records(annotation, images, "train")
    Trainer(config, build(tiny_llm, tokenizer, config), train, []).fit()
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [2, 4]  # 2 of the 4 batches in each of the 2 epochs


def test_gradient_checkpointing_same_gradients_no_layer_activations_kept(tiny_llm_dir):
    """Checkpointing the frozen LLM changes what backward keeps, not what it computes."""
    from conftest import random_batch

    from mrg.config import LLMConfig
    from mrg.model.llm import load_frozen_llm

    llm, tokenizer = load_frozen_llm(LLMConfig(source=str(tiny_llm_dir)))
    layers = llm.model.layers
    inside = [False]  # between the first decoder layer's input and the last one's output
    layers[0].register_forward_pre_hook(lambda *_: inside.__setitem__(0, True))
    layers[-1].register_forward_hook(lambda *_: inside.__setitem__(0, False))

    def step(checkpointing: bool):
        torch.manual_seed(0)
        model = MRGModel(tiny_model_config("prompt-wise"), llm, tokenizer)
        if checkpointing:
            model.enable_llm_checkpointing()
        model.train()
        kept = []

        def pack(tensor):
            if inside[0]:
                kept.append(tensor.numel() * tensor.element_size())
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(random_batch(), REPORTS[:2]).loss
        loss.backward()
        grads = [p.grad.clone() for p in model.customizer.parameters() if p.grad is not None]
        return loss.detach(), grads, sum(kept)

    plain_loss, plain_grads, plain_bytes = step(False)
    loss, grads, checkpointed_bytes = step(True)
    assert (
        llm.is_activation_checkpointing and llm.training
    )  # transformers checkpoints in train mode
    assert torch.allclose(loss, plain_loss)
    assert grads and all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads, plain_grads))
    assert plain_bytes > 1e6 and checkpointed_bytes < 0.05 * plain_bytes


def test_epoch_records_hold_peak_memory(tmp_path, four_studies, tiny_llm, tokenizer):
    annotation, images = four_studies
    config = make_config(tmp_path, annotation, images, max_steps_per_epoch=1)
    model = build(tiny_llm, tokenizer, config)
    Trainer(config, model, records(annotation, images, "train")).fit()
    record = json.loads((tmp_path / "run" / "log.jsonl").read_text().splitlines()[-1])
    assert record["memory"] == "rss" and record["peak_memory_mib"] > 100  # torch alone is more


def test_mrg_train_under_ddp_with_two_cpu_processes(tmp_path, four_studies, tiny_llm_dir):
    """torchrun starts two ranks (gloo): rank 0 alone writes, the ranks end equal, resume works."""
    import os
    import subprocess
    import sys

    annotation, images = four_studies
    config = make_config(tmp_path, annotation, images, max_steps_per_epoch=2)
    config.model.llm.source = str(tiny_llm_dir)
    config.generate = StageConfig(2, 1e-3)
    config.save(tmp_path / "config.json")

    def torchrun(*extra: str) -> None:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
        command += ["--standalone", "-m", "mrg.cli", "train", "--config"]
        command += [str(tmp_path / "config.json"), *extra]
        env = dict(os.environ, OMP_NUM_THREADS="1")
        done = subprocess.run(
            command, env=env, capture_output=True, text=True, timeout=600, check=False
        )
        assert done.returncode == 0, done.stderr[-3000:]

    torchrun("--set", "generate.epochs=1")  # one epoch, then "killed"
    torchrun("--resume")  # the second epoch, resumed under DDP
    run = tmp_path / "run"
    lines = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    epochs = [(r["stage"], r.get("epoch")) for r in lines if r["stage"] != "done"]
    assert epochs == [("generate", 1), ("generate", 2)]  # one line per epoch: rank 0 alone logs
    done = [r for r in lines if r["stage"] == "done"]
    assert [(r["ranks"], r["ranks_in_sync"]) for r in done] == [(2, True), (2, True)]
    state = torch.load(run / "last" / "trainer_state.pt", weights_only=False)
    assert state["position"]["epoch"] == 2 and (run / "best" / "model.safetensors").is_file()


def test_a_states_model_trains_on_each_reports_states_with_the_forced_sentences_first(
    tmp_path, four_studies, tiny_llm, tokenizer
):
    from mrg.data.language import ReportCorpus
    from mrg.train.stages import TrainingModule

    annotation, images = four_studies
    config = make_config(
        tmp_path,
        annotation,
        images,
        language=StageConfig(1, 3e-2),
        generate=StageConfig(1, 1e-3),
        language_reports=str(annotation),
    )
    config.model.customizer.conditioning = "visual+states"
    config.model.findings_prompt = "states"
    model = build(tiny_llm, tokenizer, config)
    module = TrainingModule(model, None, None, 0.0)
    report = "FINDINGS: Possible small left effusion. No pneumothorax.\nIMPRESSION: Cardiomegaly."
    # the labeler's states: cardiomegaly present, effusion possible, pneumothorax absent
    s = module.findings([report])[0]
    assert s.shape == (43,) and s[1] == 1 and s[14 + 2] == 1 and s[28 + 7] == 1 and s[42] == 0
    # the lead opens the findings and is the impression; the report's own sentence stating
    # the effusion again is left out, as decoding never names a lead's finding twice
    target = (
        "FINDINGS: Cardiomegaly. Possible pleural effusion. No pneumothorax.\n"
        "IMPRESSION: Cardiomegaly. Possible pleural effusion."
    )
    assert module.targets([report]) == [target]
    corpus = ReportCorpus(train=REPORTS * 2, val=REPORTS[:2], held_out=0)
    result = Trainer(config, model, records(annotation, images, "train"), [], language=corpus).fit()
    assert result.best_dir is not None
    reloaded = MRGModel.from_pretrained(result.best_dir, llm=tiny_llm, tokenizer=tokenizer)
    assert reloaded.customizer.affine.trunk.findings.in_features == 43
    condition = torch.tensor([s.tolist()])
    from conftest import random_batch

    text = reloaded.generate(random_batch(1, 1), Decoding(max_new_tokens=40), condition)[0]
    findings, impression = text.split("\nIMPRESSION: ")
    # decoding writes the forced sentences after the heart's (lead_at), here first: they
    # speak for the heart
    assert findings.startswith("FINDINGS: Cardiomegaly. Possible pleural effusion.")
    assert impression == "Cardiomegaly. Possible pleural effusion."
