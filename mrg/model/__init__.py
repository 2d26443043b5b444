"""Encoder, prompt customizers, frozen-LLM loading and the MRG model."""

from mrg.model.mrg_model import Decoding, MRGModel

__all__ = ["Decoding", "MRGModel"]
