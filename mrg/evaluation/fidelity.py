"""Label fidelity: does the report say the findings it was told to?

Given report texts, each with its true findings (the labeler's labels of that text), the
model writes a report from the findings alone (``generate(None, …, y)``: no image, as the
report-language stage trains) or from an image and the findings. The labeler reads the
generated text; fidelity is the micro-F1 of those labels against the findings given, with
macro-F1 and per-finding F1 beside it. A model that ignores its condition scores like a
constant report; one that names exactly what it was told scores 1. A states model is told
each text's states (present, possible, absent) and scored by state fidelity too
(``mrg.evaluation.states_eval.state_fidelity``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from sklearn.metrics import f1_score
from tqdm.auto import tqdm

from mrg.config import DEFAULT_DECODING, Decoding
from mrg.data.views import Views
from mrg.evaluation.states_eval import report_states, state_fidelity
from mrg.text.labeler import ReportLabeler
from mrg.text.states import PRESENT, state_vector
from mrg.text.taxonomy import FINDINGS14, findings_vector, named_findings


def label_matrix(texts: Sequence[str], labeler: ReportLabeler) -> np.ndarray:
    """``[N, 14]`` 0/1: the labeler's ChestX-ray14 positives of each text."""
    return np.array([[int(labeler.label14(t)[f]) for f in FINDINGS14] for t in texts])


def fidelity_scores(given: np.ndarray, written: np.ndarray) -> dict:
    """Micro- and macro-F1 of the written labels against the given ones, and per finding
    (findings never given are left out of the macro mean)."""
    per = {
        f: float(f1_score(given[:, c], written[:, c], zero_division=0.0))
        for c, f in enumerate(FINDINGS14)
        if given[:, c].any()
    }
    return {
        "micro_f1": float(f1_score(given.ravel(), written.ravel(), zero_division=0.0)),
        "macro_f1": float(np.mean(list(per.values()))) if per else 0.0,
        "per_finding": per,
        "reports": len(given),
        "given_positives": int(given.sum()),
        "written_positives": int(written.sum()),
    }


@torch.no_grad()
def language_fidelity(
    model,
    texts: Sequence[str],
    decoding: Decoding = DEFAULT_DECODING,
    labeler: ReportLabeler | None = None,
    batch_size: int = 8,
    image: Views | None = None,
) -> tuple[dict, list[dict]]:
    """Fidelity of ``model`` writing from the true findings (or states) of ``texts``, with no
    image or with the one study ``image`` for every text; returns the scores and one row
    per text (reference, condition given, generated)."""
    labeler = labeler or ReportLabeler()
    states = report_states(texts, labeler)  # one reading: positive labels are present states
    given = np.array([[int(s.get(f) == PRESENT) for f in FINDINGS14] for s in states])
    generated: list[str] = []
    model.eval()
    for start in tqdm(range(0, len(texts), batch_size), desc="fidelity"):
        if model.config.uses_states:
            rows = [state_vector(s) for s in states[start : start + batch_size]]
        else:
            rows = [findings_vector(named_findings(r)) for r in given[start : start + batch_size]]
        views = None if image is None else image.repeat(len(rows))
        generated += model.generate(views, decoding, torch.tensor(rows, dtype=torch.float32))
    written = label_matrix(generated, labeler)
    rows = [
        {
            "reference": t,
            "given": named_findings(g),
            "states": s,
            "generated": text,
            "written": named_findings(w),
        }
        for t, g, s, text, w in zip(texts, given, states, generated, written)
    ]
    scores = fidelity_scores(given, written)
    if model.config.uses_states:
        scores["states"] = state_fidelity(states, generated, labeler)
    return scores, rows


def fidelity_sample(
    texts: Sequence[str],
    labeler: ReportLabeler | None = None,
    abnormals: int = 100,
    normals: int = 30,
    max_words: int = 60,
) -> list[str]:
    """Held-out report texts to measure fidelity on: the first ``abnormals`` that name a
    finding, then the first ``normals`` that name none (in their order: reproducible), each
    of at most ``max_words`` words (inside the decoding budget)."""
    texts = [t for t in texts if len(t.split()) <= max_words]
    labels = label_matrix(texts, labeler or ReportLabeler())
    abnormal = [t for t, row in zip(texts, labels) if row.any()][:abnormals]
    normal = [t for t, row in zip(texts, labels) if not row.any()][:normals]
    return abnormal + normal
