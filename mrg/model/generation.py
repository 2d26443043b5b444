"""Decoding for ``MRGModel``: batched ``generate``, token streaming, the batcher's requests.

``ReportGeneration`` is mixed into ``MRGModel``; it reads the model's ``context``, ``llm``,
``tokenizer``, ``template`` and ``report_vocabulary``. The logits processors (report
structure, findings lead, closed vocabulary, penalties) are built per request by
``processors``; every decoding path uses the same list.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from transformers import LogitsProcessorList
from transformers.generation.logits_process import (
    NoRepeatNGramLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopPLogitsWarper,
)

from mrg.batching import Request, forced_run, next_tokens, prefill
from mrg.config import DEFAULT_DECODING, Decoding
from mrg.data.views import Views
from mrg.model.absent_names import AbsentNames
from mrg.model.closed_vocabulary import ClosedVocabulary, Rules
from mrg.model.decoding import (
    OnBody,
    ReportStructureProcessor,
    UnlessForced,
    report_structure,
)
from mrg.model.normal_anatomy import OPENERS, NormalAnatomy
from mrg.model.phrasing_fusion import PhrasingFusion
from mrg.model.prompting import Context, positions_from_mask, text_increments
from mrg.text.states import (
    ABSENT,
    HEDGES,
    FindingStates,
    contradicting_bigrams,
    lead_sentences,
    named,
    naming_prefixes,
    normal_anatomy,
    spoken_for,
    states_of_vector,
    unstated_prefixes,
    with_state,
)


class ReportGeneration:
    """The decoding half of ``MRGModel`` (see the module docstring)."""

    @torch.inference_mode()
    def generate(
        self,
        views: Views | None,
        decoding: Decoding = DEFAULT_DECODING,
        findings: torch.Tensor | None = None,
    ) -> list[str]:
        """Batched decoding with ``transformers`` ``generate`` (greedy, beam or sampling).

        ``views=None`` writes from the findings alone, as the report-language stage trained
        (no image, ``text_context``): what the language stage's fidelity is measured on."""
        decoding.validate()
        if views is None:
            ctx = self.text_context(len(findings), findings)
        else:
            ctx = self.context(views, findings)
        return self.generate_from(ctx, decoding)

    @torch.inference_mode()
    def generate_from(self, ctx: Context, decoding: Decoding = DEFAULT_DECODING) -> list[str]:
        """The frozen LLM's reports after the context ``ctx`` (``generate``'s second half; also
        how a baseline with a context of its own writes through the same processors)."""
        decoding.validate()
        kwargs = {
            "inputs_embeds": ctx.embeds,
            "attention_mask": ctx.attention_mask,
            "position_ids": positions_from_mask(ctx.attention_mask),
            "max_new_tokens": decoding.max_new_tokens,
            "logits_processor": self.processors(decoding, ctx.findings),
            "eos_token_id": self.template.eos_id,
            "pad_token_id": self.tokenizer.pad_token_id,
            "do_sample": decoding.strategy == "sample",
            "num_beams": decoding.num_beams if decoding.strategy == "beam" else 1,
        }
        if decoding.strategy == "sample":  # the warpers are in ``processors``: no-ops here
            kwargs.update(temperature=1.0, top_p=1.0, top_k=0)
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        out = self.llm.generate(**kwargs)
        return [text.strip() for text in self.tokenizer.batch_decode(out, skip_special_tokens=True)]

    def leads(self, states: list[FindingStates]) -> list[list[int]]:
        """Per study, the token ids of its present and possible findings' sentences ("
        Cardiomegaly. Possible pleural effusion."; none where it names none)."""
        leads = []
        for study in states:
            text = lead_sentences(study)
            leads.append(
                self.tokenizer(f" {text}", add_special_tokens=False)["input_ids"] if text else []
            )
        return leads

    def processors(
        self, decoding: Decoding, findings: torch.Tensor | None = None
    ) -> LogitsProcessorList:
        """Penalty and n-gram ban on the body, warpers, then the report structure (last, so
        that a forced header wins over everything before it). With ``lead_with_findings``,
        a sentence per present or possible finding of the condition (y's findings, or the
        states) is forced in the findings (``Decoding.lead_at`` says where) and makes the
        impression; with ``absent_bias``, a states model's absent findings are favoured after
        a negation cue until named (``AbsentNames``); with ``closed_vocabulary``, only words of
        ``report_vocabulary`` are written, after such a lead no word that names one of its
        findings again, and beside a present or possible finding no global-normal
        statement."""
        structure = report_structure(self.tokenizer, self.template.eos_id)
        states = [states_of_vector(y) for y in findings.tolist()] if findings is not None else None
        leads = self.leads(states) if decoding.lead_with_findings and states is not None else None
        choosing = LogitsProcessorList()  # the LLM's own choices: skipped where all are forced
        absent = None
        if decoding.absent_bias and states is not None and self.config.uses_states:
            absent = [with_state(study, ABSENT) for study in states]
            found = [named(study) for study in states]
            choosing.append(AbsentNames(structure, absent, decoding.absent_bias, found))
        shape = ReportStructureProcessor(
            structure,
            decoding.max_new_tokens,
            leads=leads,
            lead_at=decoding.lead_at,
            anatomy_words=decoding.anatomy_words,
            absent=absent,
            close_bias=decoding.close_bias,
            parts=tuple(OPENERS) if decoding.describe_bias and decoding.anatomy_words else (),
        )
        if decoding.repetition_penalty != 1.0:
            choosing.append(
                OnBody(RepetitionPenaltyLogitsProcessor(decoding.repetition_penalty), structure)
            )
        if decoding.no_repeat_ngram_size:
            choosing.append(
                OnBody(
                    NoRepeatNGramLogitsProcessor(decoding.no_repeat_ngram_size),
                    structure,
                    apart=True,
                )
            )
        anatomy = NormalAnatomy(shape, decoding.describe_bias) if shape.parts else None
        # before top-p and the closed vocabulary, which keep the top tokens only
        if anatomy is not None:
            choosing.append(anatomy)
        if decoding.strategy == "sample":
            choosing.append(TemperatureLogitsWarper(decoding.temperature))
            choosing.append(TopPLogitsWarper(decoding.top_p))
        if decoding.closed_vocabulary and self.report_vocabulary:
            rules = None if states is None else [self._rules(s, bool(leads)) for s in states]
            phrasing = self.report_phrasing
            pairs = phrasing.pairs if decoding.word_pairs and phrasing else None
            choosing.append(
                ClosedVocabulary(
                    structure,
                    self.report_vocabulary,
                    rules,
                    pairs=pairs,
                    forced=shape.forced,
                    opening=anatomy.next if anatomy is not None else None,
                )
            )
            if decoding.phrasing_weight and self.report_phrasing:
                choosing.append(
                    PhrasingFusion(structure, self.report_phrasing, decoding.phrasing_weight)
                )
        return LogitsProcessorList([UnlessForced(choosing, shape), shape])

    def _rules(self, states: FindingStates, lead: bool) -> Rules:
        """What a report written from ``states`` may not write (``mrg.model.closed_vocabulary.
        Rules``): with a lead, the findings it names (in any words: "The heart is large."
        beside "Possible cardiomegaly."), or a hedge, outside it, nor a sentence on the part
        its findings' sentences speak for; a states model, a finding it does not state
        present or possible except to negate it, or a sentence calling the anatomy of one it
        does normal; beside a present or possible finding, a global-normal statement (and
        beside a pleural one, "no pleural disease")."""
        found = named(states)
        return Rules(
            stated=naming_prefixes(found) | HEDGES if lead else frozenset(),
            unstated=unstated_prefixes(states) if self.config.uses_states else frozenset(),
            bigrams=contradicting_bigrams(states),
            normal=normal_anatomy(states) if self.config.uses_states else frozenset(),
            subjects=spoken_for(states) if lead else frozenset(),
        )

    @torch.inference_mode()
    def stream_ids(
        self,
        views: Views,
        decoding: Decoding = DEFAULT_DECODING,
        findings: torch.Tensor | None = None,
    ) -> Iterator[int]:
        """Yield token ids of one study one at a time (KV cache on); stops at EOS. The
        batcher's computation for a request alone: the forced opening read with the context
        (``mrg.batching.prefill``), then a step per token the LLM chooses, until the rest is
        forced (``mrg.batching.forced_run``).

        Closing the generator stops the computation at once: that is how a cancelled
        request frees the model.
        """
        if views.batch_size != 1:
            raise ValueError("stream_ids decodes one study at a time")
        request = self.decoding_request(views, decoding, findings)
        generated, ends = forced_run(request, [])
        yield from generated
        if ends:
            return
        out, mask = prefill(self.llm, request, generated)
        while True:
            tokens, ends = next_tokens(request, generated, out.logits[:, -1])
            for token in tokens:
                generated.append(token)
                yield token
            if ends:
                return
            mask = torch.cat([mask, mask.new_ones(1, 1)], dim=1)
            out = self.llm(
                input_ids=torch.tensor([tokens[-1:]], device=self.device),
                attention_mask=mask,
                position_ids=positions_from_mask(mask)[:, -1:],
                past_key_values=out.past_key_values,
                use_cache=True,
            )

    def stream(
        self,
        views: Views,
        decoding: Decoding = DEFAULT_DECODING,
        findings: torch.Tensor | None = None,
    ) -> Iterator[str]:
        """Yield text increments; their concatenation is the decoded report."""
        yield from text_increments(self.tokenizer, self.stream_ids(views, decoding, findings))

    @torch.inference_mode()
    def decoding_request(
        self,
        views: Views,
        decoding: Decoding = DEFAULT_DECODING,
        findings: torch.Tensor | None = None,
    ) -> Request:
        """One study's context and processors, for the continuous batcher (``mrg.batching``)."""
        decoding.validate()
        if decoding.strategy == "beam":
            raise ValueError("beam search is not streamable; use generate()")
        if views.batch_size != 1:
            raise ValueError("a decoding request holds one study")
        ctx = self.context(views, findings)
        shared = len(self.template.prefix_ids)  # one row: no left padding before the prefix
        processors = self.processors(decoding, ctx.findings)
        return Request(
            ctx.embeds[:, shared:],
            ctx.attention_mask,
            processors,
            decoding.max_new_tokens,
            self.template.eos_id,
            sample=decoding.strategy == "sample",
            prefix=self.shared_prefix(),
            forced=lambda ids: processors[-1].forced(ids, 0, 1),  # the report structure's
        )

    @torch.inference_mode()
    def shared_prefix(self) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
        """The frozen LLM's keys and values of the template's prefix (the chat's system turn,
        the same for every study), per layer: computed once per device and dtype, so that a
        request's prefill starts after it (``mrg.batching.prefill``)."""
        key = (self.device, self.llm_dtype, tuple(self.template.prefix_ids))
        if not self.template.prefix_ids:
            return ()
        if getattr(self, "_shared_prefix", (None,))[0] != key:
            n = len(self.template.prefix_ids)
            out = self.llm(
                inputs_embeds=self.embed_ids(self.template.prefix_ids, 1),
                position_ids=torch.arange(n, device=self.device).unsqueeze(0),
                use_cache=True,
                logits_to_keep=1,
            )
            layers = out.past_key_values.layers
            self._shared_prefix = (key, tuple((layer.keys, layer.values) for layer in layers))
        return self._shared_prefix[1]
