"""The real SmolLM2-135M with the real hybrid encoder on real chest X-rays (../shared/data)."""

import pytest
import torch
from conftest import shared_path

from mrg.data.study import batch_tensors, study_from_sources
from mrg.model import Decoding, MRGModel
from mrg.presets import model_preset

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def iu_study():
    root = shared_path("iu_xray", "images", "CXR2843_IM-1254-1001")
    return study_from_sources(root / "0.png", root / "1.png", study_id="CXR2843_IM-1254-1001")


@pytest.mark.parametrize("mode", ["prompt-wise", "promptbook-wise"])
def test_one_training_step_with_smollm2(smollm2, iu_study, mode):
    llm, tokenizer = smollm2
    torch.manual_seed(0)
    model = MRGModel(model_preset("demo-cpu", mode), llm, tokenizer).train()
    views = batch_tensors([iu_study], size=224)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    report = (
        "FINDINGS: The heart is normal in size. The lungs are clear. IMPRESSION: No acute disease."
    )
    loss = model(views, [report]).loss
    assert torch.isfinite(loss) and 0 < loss.item() < 20
    loss.backward()
    optimizer.step()
    assert all(p.grad is None for p in llm.parameters())
    with torch.no_grad():
        assert model(views, [report]).loss.item() != loss.item()


def test_generates_at_least_ten_tokens_from_a_real_chest_xray(smollm2, iu_study):
    llm, tokenizer = smollm2
    torch.manual_seed(0)
    model = MRGModel(model_preset("demo-cpu", "prompt-wise"), llm, tokenizer).eval()
    views = batch_tensors([iu_study], size=224)
    assert views.mask.all() and views.ids.tolist() == [[0, 1]]
    ids = list(model.stream_ids(views, Decoding(max_new_tokens=16, repetition_penalty=1.0)))
    assert len(ids) >= 10, tokenizer.decode(ids)
    assert tokenizer.decode(ids).strip()
