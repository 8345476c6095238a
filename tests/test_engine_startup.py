"""What an engine agrees to start with, and what a plain engine refuses per request."""

import json
import os
import shutil
from pathlib import Path

import pytest
from vllm import LLM, SamplingParams

from vllm_align.config import AlignConfigError
from vllm_align.toy.models import build_llama_pair


def _start(aligned: str, align: dict) -> LLM:
    return LLM(model=aligned, additional_config={"align": align}, dtype="float32",
               max_model_len=256, enforce_eager=True)


def test_vocabulary_size_mismatch_refused(tiny_pair, tmp_path):
    _, other_ref = build_llama_pair(tmp_path / "small-vocab", vocab_size=512, seed=1)
    with pytest.raises(AlignConfigError, match="vocabulary size mismatch: .* 1024 .* 512"):
        _start(tiny_pair[0], {"reference_model": other_ref})


def test_tokenizer_mismatch_refused(tiny_pair, tmp_path):
    # Same size, different merges: a tokenizer trained on another corpus.
    from vllm_align.toy.models import train_tokenizer

    reference = tmp_path / "reference"
    shutil.copytree(tiny_pair[1], reference)
    train_tokenizer(reference, vocab_size=1024,
                    corpus=["zebra quartz jolly vexing " * 5, "xylophone kumquat " * 5] * 200)
    with pytest.raises(AlignConfigError, match="tokenizer mismatch"):
        _start(tiny_pair[0], {"reference_model": str(reference)})


def test_architecture_mismatch_refused(tiny_pair, tmp_path):
    reference = tmp_path / "reference"
    shutil.copytree(tiny_pair[1], reference)
    config = json.loads((reference / "config.json").read_text())
    config["architectures"] = ["MistralForCausalLM"]
    (reference / "config.json").write_text(json.dumps(config))
    with pytest.raises(AlignConfigError, match="architecture mismatch"):
        _start(tiny_pair[0], {"reference_model": str(reference)})


@pytest.mark.parametrize("align, message", [
    ({"reference_model": "/nonexistent/model"}, "cannot load reference model config"),
    ({"default": {"method": "aad"}}, "needs a reference model"),
    ({"default": {"method": "dera", "lambda": "x"}}, "must be a number"),
    ({"reference": "x"}, "unknown additional_config['align'] key"),
])
def test_bad_engine_config_refused(tiny_pair, align, message):
    with pytest.raises(AlignConfigError) as err:
        _start(tiny_pair[0], align)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_engine_without_alignment_config_refuses_align_requests(tiny_pair):
    """The plugin is installed, the engine was started plainly: refuse, never ignore."""
    llm = LLM(model=tiny_pair[0], dtype="float32", max_model_len=256, enforce_eager=True)
    dera = SamplingParams(max_tokens=2, extra_args={"align": {"method": "dera", "lambda": 0.5}})
    with pytest.raises(ValueError, match="needs a reference model"):
        llm.generate(["hi"], dera, use_tqdm=False)
    with pytest.raises(ValueError, match="unknown alignment method"):
        llm.generate(["hi"], SamplingParams(extra_args={"align": {"method": "x"}}),
                     use_tqdm=False)
    none = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True,
                          extra_args={"align": {"method": "none"}})
    plain = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
    outs = llm.generate(["hi", "hi"], [none, plain], use_tqdm=False)
    assert outs[0].outputs[0].token_ids == outs[1].outputs[0].token_ids
    assert Path(tiny_pair[0]).exists()

    # ...and is otherwise as without the plugin: vLLM's own runner choice (on a GPU
    # its V2 default), none of the plugin's logits processors in the workers.
    from vllm_align.patches.vllm_config import VllmConfigPatch

    config = llm.llm_engine.vllm_config
    assert "VLLM_USE_V2_MODEL_RUNNER" not in os.environ
    assert config.use_v2_model_runner == VllmConfigPatch.original(
        "use_v2_model_runner").fget(config)
    loaded = llm.collective_rpc(lambda worker: [
        f"{type(p).__module__}.{type(p).__name__}"
        for p in worker.model_runner.input_batch.logitsprocs.all])
    assert loaded and not any("vllm_align" in name for names in loaded for name in names)

