"""The inference service: load once, stream sections, explain, compare with the ground truth.

``ReportService.load`` reads the frozen LLM once and puts every customizer model found in a
checkpoint folder (``prompt-wise/``, ``promptbook-wise/``, optionally ``static/``) on top of
it. Greedy and sampled reports decode in one continuous batch (``mrg.batching``): a request
that arrives while others decode joins them at the next step, whatever its mode; past the
batch and the waiting room, a request is refused at once with ``ServiceBusy``. Every torch
computation (encoding an image, the findings head, the gate, beam search, Grad-CAM) runs on
the batcher's thread, one at a time, between two decoding steps (``on_torch_thread``).

Where the checkpoints hold a findings head (``<checkpoints>/findings/``), every study is read
by it first: its calibrated probabilities and states (``StudyFindings``) are what a states
model writes the report from (a model before the states: the findings above their operating
points). A reviewer may set them by hand instead (``stream(…, findings={"Effusion":
"possible"})``, "write the report as if it showed a possible effusion"). Cancelling is
closing the stream (or ``should_stop`` returning True): the request leaves the batch at the
next step.

Before anything is written, the study passes the chest-radiograph gate (``mrg.model.gate``):
a CT, an MR, a photograph or a rotated film is refused with ``StudyRefused``, unless the
request allows any image anyway, and then the report carries the gate's warning.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import torch

from mrg.batching import Batcher
from mrg.config import DEFAULT_DECODING
from mrg.data.study import Study, batch_tensors
from mrg.data.views import Views
from mrg.explain import Heatmap, explain, explain_finding
from mrg.hub import checkpoint_modes
from mrg.model import Decoding, MRGModel
from mrg.model.findings import FindingsHead, points_for_json
from mrg.model.gate import ChestGate, Screening, read_study, screen_study
from mrg.model.llm import load_frozen_llm
from mrg.model.prompting import text_increments
from mrg.service.answers import (
    Comparison,
    Manual,
    ReportUpdate,
    StudyFindings,
    StudyRefused,
    find_span,
)
from mrg.service.comparison import compare
from mrg.service.models import (
    ServiceInfo,
    describe,
    load_findings_head,
    load_gate,
    load_models,
    resolve_device,
    resolve_llm_config,
)
from mrg.text.labeler import ReportLabeler
from mrg.text.sections import split_sections
from mrg.text.states import manual_states, named
from mrg.text.taxonomy import (
    FINDINGS14,
    finding_named,
    named_findings,
)

log = logging.getLogger(__name__)
T = TypeVar("T")


def reusable(screening: Screening | None) -> bool:
    """Whether a verdict handed to ``stream`` stands for the gate's: one made without the
    override (a verdict allowed anyway no longer says why the gate refused)."""
    return screening is not None and not screening.allowed_anyway


class ReportService:
    def __init__(
        self,
        models: dict[str, MRGModel],
        info: ServiceInfo,
        max_batch: int = 8,
        max_waiting: int = 8,
        findings_head: FindingsHead | None = None,
        gate: ChestGate | None = None,
    ):
        """``max_batch`` reports decode together; ``max_waiting`` more may wait for a place.
        ``gate`` scores what the findings head reads; without both only its rules apply."""
        self.models, self.info = models, info
        self.findings_head, self.gate = findings_head, gate
        self.labeler = ReportLabeler()
        llms = {id(m.llm): m.llm for m in models.values()}
        self.batchers = {key: Batcher(llm, max_batch, max_waiting) for key, llm in llms.items()}
        self._torch_thread = next(iter(self.batchers.values()))

    def on_torch_thread(self, fn: Callable[[], T]) -> T:
        """``fn()`` run on the batcher's thread, where all of the service's torch work runs,
        one computation at a time (``mrg.batching``: one OpenMP team, 2× faster decoding)."""
        return self._torch_thread.call(fn)

    # ------------------------------------------------------------------ loading

    @classmethod
    def load(
        cls,
        checkpoints: str | Path | None = None,
        llm_source: str | None = None,
        device: str | None = None,
        quantization: str | None = None,
        dtype: str | None = None,
    ) -> ReportService:
        """Load every mode found under ``checkpoints`` (default ``$MRG_CHECKPOINTS`` or assets/checkpoints).

        ``quantization`` and ``dtype`` are the frozen LLM's: ``"auto"`` (or None) on a CPU
        takes the setting measured fastest there (``mrg.model.cpu_probe``: fp32, bf16, or the
        weight-only int8/int4 layers), elsewhere the checkpoint's; an explicit dtype keeps the
        checkpoint's quantization. The trainable parts stay float32. Without any checkpoint,
        untrained demo-cpu models are built so the app still runs; ``info.trained`` is then
        False and the banner says so.

        The loading runs in a thread of its own that ends with it, so that the OpenMP team
        its torch work made ends too and the batcher's is the only one (``mrg.batching``).
        """
        with ThreadPoolExecutor(1, thread_name_prefix="mrg-load") as pool:
            loading = pool.submit(cls._load, checkpoints, llm_source, device, quantization, dtype)
            return loading.result()

    @classmethod
    def _load(cls, checkpoints, llm_source, device, quantization, dtype) -> ReportService:
        found = checkpoint_modes(checkpoints)
        device = resolve_device(device)
        llm_config, overrides = resolve_llm_config(found, device, llm_source, quantization, dtype)
        llm, tokenizer = load_frozen_llm(llm_config)
        if device == "cuda" and llm_config.quantization == "none":
            llm.to("cuda")
        models = load_models(found, llm, tokenizer, overrides)
        head, gate = load_findings_head(found), load_gate(found)
        info = describe(llm_config, llm, models, found, gate)
        return cls(models, info, findings_head=head, gate=gate)

    def model(self, mode: str) -> MRGModel:
        if mode not in self.models:
            raise ValueError(f"mode {mode!r} is not loaded; available: {', '.join(self.models)}")
        return self.models[mode]

    def views(self, study: Study, mode: str) -> Views:
        """``study`` as ``mode``'s model reads it (its image size and number of views)."""
        model = self.model(mode)
        size, views = model.config.encoder.image_size, model.config.max_views
        return self.on_torch_thread(lambda: batch_tensors([study], size, views))

    # ------------------------------------------------------------------ the gate

    def screen(self, study: Study, allow_anyway: bool = False) -> Screening:
        """The gate's verdict on every view of ``study`` (``mrg.model.gate.screen``)."""
        return self.on_torch_thread(
            lambda: screen_study(study, self.findings_head, self.gate, allow_anyway)
        )

    # ------------------------------------------------------------------ findings

    def screen_and_read(
        self, study: Study, allow_anyway: bool = False, manual: Manual = None
    ) -> tuple[Screening, StudyFindings | None]:
        """(``screen``, ``read_findings``) from one pass of the findings head; no findings
        for a study the gate refuses."""

        def both() -> tuple[Screening, StudyFindings | None]:
            screening, features = read_study(study, self.findings_head, self.gate, allow_anyway)
            if screening.refused:
                return screening, None
            return screening, self._reading(features, manual)

        return self.on_torch_thread(both)

    def read_findings(self, study: Study, manual: Manual = None) -> StudyFindings | None:
        """The head's probabilities and states for ``study``, or the condition set by hand:
        ``manual`` is ChestX-ray14 names (each present; [] is a normal study) or a mapping of
        names to states ("Effusion": "possible"). None without a head and without ``manual``."""
        return self.screen_and_read(study, allow_anyway=True, manual=manual)[1]

    def _reading(self, features: torch.Tensor | None, manual: Manual) -> StudyFindings | None:
        """``read_findings``'s answer from the head's pooled features of a study's views."""
        states = None if manual is None else manual_states(manual)
        found = None if states is None else named(states)
        head = self.findings_head
        if head is None:
            if states is None:
                return None
            return StudyFindings({}, {}, found, manual=True, states=states)
        probabilities, y = head.predict_pooled(features)
        p, t = probabilities[0].tolist(), head.threshold.tolist()
        return StudyFindings(
            dict(zip(FINDINGS14, p)),
            dict(zip(FINDINGS14, t)),
            found if found is not None else named_findings(y[0].tolist()),
            manual=states is not None,
            states=states if states is not None else head.states(probabilities)[0],
            present_thresholds=dict(zip(FINDINGS14, points_for_json(head.present_threshold))),
            possible_thresholds=dict(zip(FINDINGS14, points_for_json(head.possible_threshold))),
        )

    def _condition(
        self, model: MRGModel, condition: StudyFindings | None
    ) -> tuple[StudyFindings | None, torch.Tensor | None]:
        """(``condition``: the head's reading or the findings set by hand, the condition y
        ``model`` takes from it): y is None for a model that writes from the image alone."""
        if not model.config.uses_findings:
            if condition is not None and condition.manual:
                raise ValueError(
                    f"the {model.mode} model writes from the image alone: it cannot be given findings"
                )
            return condition, None
        if condition is None:
            raise ValueError(
                "this model writes reports from findings, but no findings head is loaded: "
                "set the findings by hand"
            )
        return condition, condition.vector(model.config.condition_width)

    # ------------------------------------------------------------------ generation

    def stream(
        self,
        study: Study,
        mode: str,
        decoding: Decoding = DEFAULT_DECODING,
        should_stop: Callable[[], bool] | None = None,
        findings: Manual | StudyFindings = None,
        allow_anyway: bool = False,
        screening: Screening | None = None,
    ) -> Iterator[ReportUpdate]:
        """Yield a ``ReportUpdate`` per decoded token (greedy/sampling) or once (beam).

        ``findings``: the findings to write from, set by hand (names, each present, [] for
        none; or names → states), or a ``StudyFindings`` already read; by default the head's,
        for a conditioned model. With a ``StudyFindings``, ``screening`` is the gate's verdict
        made beside it without the override (``screen_and_read``, at the page's upload): the
        study then goes through no network before its context.
        Raises ``StudyRefused`` where the gate refuses the study and ``allow_anyway`` is off."""
        decoding.validate()
        model = self.model(mode)
        start = time.perf_counter()

        def prepare():
            """The gate, the findings, and the beam's report or the decoding request: one
            call on the torch thread, so that a request waits for one decoding step, not four."""
            if isinstance(findings, StudyFindings) and reusable(screening):  # the page's upload
                verdict, reading = screening.overridden(allow_anyway), findings
            elif isinstance(findings, StudyFindings):  # read already, not screened beside it
                verdict, reading = self.screen(study, allow_anyway), findings
            else:
                verdict, reading = self.screen_and_read(study, allow_anyway, findings)
            if verdict.refused:
                raise StudyRefused(verdict)
            views = self.views(study, mode)
            condition, y = self._condition(model, reading)
            if decoding.strategy == "beam":
                return verdict, condition, model.generate(views, decoding, y)[0]
            return verdict, condition, model.decoding_request(views, decoding, y)

        verdict, condition, prepared = self.on_torch_thread(prepare)
        if decoding.strategy == "beam":
            text, elapsed = prepared, time.perf_counter() - start
            tokens = len(model.tokenizer(text, add_special_tokens=False)["input_ids"])
            yield self._update(text, True, tokens, elapsed, start, condition, verdict)
            return
        ids = self.batchers[id(model.llm)].stream(prepared)
        text, tokens, first = "", 0, None
        try:
            for piece in text_increments(model.tokenizer, ids):
                if should_stop is not None and should_stop():
                    break
                tokens += 1
                first = first if first is not None else time.perf_counter() - start
                text += piece
                yield self._update(text, False, tokens, first, start, condition, verdict)
        finally:
            ids.close()  # leaves the batch at its next step
        yield self._update(text, True, tokens, first, start, condition, verdict)

    @staticmethod
    def _update(
        text: str,
        finished: bool,
        tokens: int,
        ttft: float | None,
        start: float,
        condition: StudyFindings | None = None,
        screening: Screening | None = None,
    ) -> ReportUpdate:
        elapsed = time.perf_counter() - start
        sections = split_sections(text)
        rate = (
            (tokens - 1) / (elapsed - ttft)
            if ttft is not None and tokens > 1 and elapsed > ttft
            else None
        )
        return ReportUpdate(
            findings=sections.findings,
            impression=sections.impression,
            text=text.strip(),
            finished=finished,
            tokens=tokens,
            ttft_s=ttft,
            tokens_per_s=rate,
            elapsed_s=elapsed,
            condition=condition,
            screening=screening,
        )

    def generate(
        self,
        study: Study,
        mode: str,
        decoding: Decoding = DEFAULT_DECODING,
        findings: Manual | StudyFindings = None,
        allow_anyway: bool = False,
        screening: Screening | None = None,
    ) -> ReportUpdate:
        """The final update of ``stream``."""
        update = ReportUpdate()
        for update in self.stream(
            study, mode, decoding, findings=findings, allow_anyway=allow_anyway, screening=screening
        ):
            pass
        return update

    # ------------------------------------------------------------------ explanation

    def explain(
        self,
        study: Study,
        mode: str,
        report: str,
        sentence: str | None = None,
        findings: Manual | StudyFindings = None,
    ) -> list[Heatmap]:
        """Grad-CAM per view for the whole report, or for one of its sentences (scored under
        the findings it was written from: ``findings`` as for ``stream``)."""
        model = self.model(mode)
        views = self.views(study, mode)
        span = find_span(report, sentence) if sentence else None
        reading = findings if isinstance(findings, StudyFindings) else None
        _, y = self._condition(model, reading or self.read_findings(study, findings))
        positions = [v.position for v in study.views]
        return self.on_torch_thread(lambda: explain(model, views, report, span, positions, y))

    def explain_finding(self, study: Study, finding: str) -> list[Heatmap]:
        """Grad-CAM per view of the findings head's logit for ``finding`` (CheXNet's picture)."""
        if self.findings_head is None:
            raise ValueError("no findings head is loaded")
        head, named = self.findings_head, finding_named(finding)
        positions = [v.position for v in study.views]

        def heatmaps() -> list[Heatmap]:
            views = batch_tensors([study], head.config.image_size, self.info.views)
            return explain_finding(head, views, named, positions)

        return self.on_torch_thread(heatmaps)

    # ------------------------------------------------------------------ comparison

    def compare(self, generated: str, reference: str, meteor: bool = False) -> Comparison:
        """Per-case language metrics and CheXpert label agreement (``comparison.compare``)."""
        return compare(self.labeler, generated, reference, meteor)
