"""The local toy checkpoints (``vllm_align.toy.models.build_llama_pair``) every engine
test decodes: loadable, one shared tokenizer, two different but related models, rebuilt
byte for byte from the same arguments."""

from __future__ import annotations

import json
import os

import pytest
import torch

import hf_reference
from vllm_align.toy.models import build_llama_pair

PROMPTS = [
    "The old teacher found a golden book near the river.",
    "Where did the careful farmer leave the letters?",
]


@pytest.fixture(scope="module")
def pair_paths(tiny_pair):
    return tiny_pair  # conftest.py: build_llama_pair(tmp dir, seed=0), once per session


@pytest.fixture(scope="module")
def pair(pair_paths):
    return hf_reference.load_pair(*pair_paths)


@pytest.fixture(scope="module")
def tokenizer(pair_paths):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(pair_paths[0])


def test_pair_loads_and_shares_tokenizer(pair_paths, pair):
    from transformers import AutoConfig, AutoTokenizer

    aligned_path, reference_path = pair_paths
    tok_a = AutoTokenizer.from_pretrained(aligned_path)
    tok_r = AutoTokenizer.from_pretrained(reference_path)
    with open(os.path.join(aligned_path, "tokenizer.json"), "rb") as f_a, \
            open(os.path.join(reference_path, "tokenizer.json"), "rb") as f_r:
        assert f_a.read() == f_r.read()
    assert tok_a.get_vocab() == tok_r.get_vocab()
    for path, model in zip(pair_paths, pair):
        config = AutoConfig.from_pretrained(path)
        assert config.architectures == ["LlamaForCausalLM"]
        assert config.vocab_size == len(tok_a) == 1024
        assert config.hidden_size // config.num_attention_heads == 64
        assert config.head_dim == 64
        assert config.tie_word_embeddings is False
        assert config.bos_token_id == tok_a.bos_token_id
        assert config.eos_token_id == tok_a.eos_token_id
        assert model.generation_config.eos_token_id == tok_a.eos_token_id
        assert model.generation_config.bos_token_id == tok_a.bos_token_id
        assert model.dtype == torch.float32
        assert model.get_output_embeddings().weight.shape == (1024, 256)
        assert os.path.isfile(os.path.join(path, "model.safetensors"))


def test_tokenizer_round_trip_and_chat_template(tokenizer):
    ids = tokenizer(PROMPTS[0]).input_ids
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == PROMPTS[0]
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hello there"}], tokenize=False,
        add_generation_prompt=True)
    assert text == "<s><|user|>\nHello there</s>\n<|assistant|>\n"
    chat_ids = tokenizer(text, add_special_tokens=False).input_ids
    assert chat_ids[0] == tokenizer.bos_token_id
    assert tokenizer.convert_tokens_to_ids("<|assistant|>") in chat_ids


def test_models_differ_but_share_embeddings(pair, tokenizer):
    aligned, reference = pair
    ids = torch.tensor([tokenizer(PROMPTS[1]).input_ids])
    with torch.no_grad():
        logits_a = aligned(ids).logits[0]
        logits_r = reference(ids).logits[0]
    assert not torch.allclose(logits_a, logits_r, atol=1e-2)
    # Noticeably different distributions, yet the same model "nudged".
    kl = (logits_a.log_softmax(-1).exp()
          * (logits_a.log_softmax(-1) - logits_r.log_softmax(-1))).sum(-1)
    assert 0.01 < float(kl.mean()) < 5.0
    # The perturbation touches only lm_head and the last layer's outputs.
    assert torch.equal(aligned.get_input_embeddings().weight,
                       reference.get_input_embeddings().weight)
    assert not torch.equal(aligned.get_output_embeddings().weight,
                           reference.get_output_embeddings().weight)


def test_build_is_idempotent_and_deterministic(pair_paths, tmp_path):
    aligned_path, _ = pair_paths
    weights = os.path.join(aligned_path, "model.safetensors")
    mtime = os.stat(weights).st_mtime_ns
    assert build_llama_pair(os.path.dirname(aligned_path), seed=0) == pair_paths
    assert os.stat(weights).st_mtime_ns == mtime  # reused, not rebuilt

    # Same arguments elsewhere: byte-identical checkpoints.
    again = build_llama_pair(tmp_path / "again", seed=0)
    for built, rebuilt in zip(pair_paths, again):
        for name in ("model.safetensors", "tokenizer.json", "config.json"):
            with open(os.path.join(built, name), "rb") as f1, \
                    open(os.path.join(rebuilt, name), "rb") as f2:
                assert f1.read() == f2.read(), name

    # Other arguments in the same directory: rebuilt, stamp updated.
    build_llama_pair(tmp_path / "again", seed=1)
    stamp = json.loads((tmp_path / "again" / "stamp.json").read_text())
    assert stamp["key"]["seed"] == 1
    with open(os.path.join(pair_paths[1], "model.safetensors"), "rb") as f1, \
            open(os.path.join(again[1], "model.safetensors"), "rb") as f2:
        assert f1.read() != f2.read()


def test_bad_head_dim_rejected(tmp_path):
    with pytest.raises(ValueError, match="64"):
        build_llama_pair(tmp_path / "bad", hidden_size=256, num_heads=16)
