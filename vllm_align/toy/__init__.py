"""Small local checkpoints for tests, demos and benchmarks (no model hub).

``vllm_align.toy.models`` trains a tokenizer on a built-in synthetic corpus
and builds an aligned/reference Llama pair that shares it.
"""

from vllm_align.toy.models import build_llama_pair, synthetic_corpus, train_tokenizer

__all__ = ["build_llama_pair", "synthetic_corpus", "train_tokenizer"]
