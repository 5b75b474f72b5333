"""Data sources (files, hub datasets, packaged demo data) and tokenisation."""

from rayexit.data.encode import EncodedSet, encode_examples, iterate_batches
from rayexit.data.sources import TextExamples, load_text_classification

__all__ = [
    "EncodedSet",
    "TextExamples",
    "encode_examples",
    "iterate_batches",
    "load_text_classification",
]
