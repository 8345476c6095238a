"""Small local checkpoints for tests, demos and benchmarks (no model hub).

``vllm_align.toy.models`` trains a tokenizer on a built-in synthetic corpus
and builds an aligned/reference Llama pair that shares it (random weights,
for engine tests and benchmarks). ``vllm_align.toy.world`` trains a real
SFT/DPO pair on a synthetic chat corpus with a politeness reward (the demo's
and the alignment tests' "toy world").
"""

from vllm_align.toy.models import build_llama_pair, synthetic_corpus, train_tokenizer
from vllm_align.toy.world import ToyWorld, build_toy_world, polite_reward

__all__ = ["ToyWorld", "build_llama_pair", "build_toy_world", "polite_reward",
           "synthetic_corpus", "train_tokenizer"]
