"""Encoder, prompt customizers, frozen-LLM loading and the MRG model."""

from mrg.config import Decoding
from mrg.model.mrg_model import MRGModel

__all__ = ["Decoding", "MRGModel"]
