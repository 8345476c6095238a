"""The toy world (vllm_align.toy.world) decoded through the engine.

The world is a tiny SFT model, a DPO model trained from it on a rule-based
politeness preference, and the rule reward. Through one vLLM engine (DPO model
aligned, SFT model reference) and one mixed batch over the 64 held-out prompts:

* the mean polite reward rises strictly with DeRa's lambda over {0, 0.5, 1, 2};
* AAD (alpha 0.1) beats greedy decoding of the DPO model.

On worlds of seeds 0-3 neighbouring values differ by about 0.02 or more
(docs/toy-measurements.md): some 25 of the 256 polite/plain slot choices (4 per
answer) would have to go the other way to break an order.

The world is the one shipped in the repository (``vllm_align.toy.shipped``,
what ``make demo`` decodes); ``make toy-assets`` rebuilds it.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import statistics
from pathlib import Path

import pytest

from vllm_align.cli.demo_runs import Run, decode_runs
from vllm_align.toy import corpus, shipped
from vllm_align.toy import world as toy

LAMBDAS = (0.0, 0.5, 1.0, 2.0)
METHODS = {
    **{f"dera {lam}": {"method": "dera", "lambda": lam} for lam in LAMBDAS},
    "none": {"method": "none"},
    "aad 0.1": {"method": "aad", "alpha": 0.1},
}


@pytest.fixture(scope="module")
def world() -> toy.ToyWorld:
    return shipped.world()


@pytest.fixture(scope="module")
def outputs(world):
    """Method name -> CompletionOutput per held-out prompt, all from ONE generate call."""
    from vllm import LLM

    llm = LLM(model=world.dpo_path, dtype="float32", max_model_len=256, seed=0, enforce_eager=True,
              additional_config={"align": {"reference_model": world.sft_path}})
    try:
        runs = {name: Run(spec, sampled=False, label=name) for name, spec in METHODS.items()}
        yield {name: reps[0] for name, reps in decode_runs(
            llm, world.prompt_token_ids(llm.get_tokenizer()), runs, max_tokens=96).items()}
    finally:
        del llm


def _mean_reward(world, outs) -> float:
    return statistics.mean(world.reward(o.text) for o in outs)


# -- no engine --------------------------------------------------------------

def test_polite_reward():
    assert toy.polite_reward("") == 0.0
    assert toy.polite_reward("The dog is old.") == 0.0
    assert toy.polite_reward("Thank you.") == 0.5
    assert toy.polite_reward("Please, PLEASE help!") == pytest.approx(2 / 3)
    assert toy.polite_reward("You are welcome, sorry.") == 0.5


def test_eval_prompts_are_held_out():
    prompts = corpus.eval_prompts(seed=0)
    assert len(prompts) == len(set(prompts)) == 64
    train, _ = corpus.split_requests(seed=0, num_eval=64)
    assert not {r.text for r in train} & set(prompts)
    assert not {p for p, _ in corpus.toy_corpus(5000, seed=0)} & set(prompts)


def test_build_is_stamped_and_reused(world, tmp_path):
    """A built world (here a copy of the shipped one) is reused, not rebuilt; a stale stamp
    is noticed."""
    for name in ("sft", "dpo", "stamp.json"):
        src = Path(world.sft_path).parent / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, tmp_path / name)
    made = (tmp_path / "sft" / "model.safetensors").stat().st_mtime_ns
    again = toy.build_toy_world(tmp_path, seed=0)
    assert again.prompts == world.prompts and again.sft_path == str(tmp_path / "sft")
    assert (tmp_path / "sft" / "model.safetensors").stat().st_mtime_ns == made
    for path in (again.sft_path, again.dpo_path):
        assert (Path(path) / "tokenizer.json").is_file()
    (tmp_path / "stamp.json").write_text('{"key": {"recipe_version": 0}}')
    assert toy.read_toy_world(tmp_path, seed=0) is None


# -- through the engine -----------------------------------------------------

def test_dera_reward_rises_with_lambda(world, outputs):
    rewards = [_mean_reward(world, outputs[f"dera {lam}"]) for lam in LAMBDAS]
    assert all(a < b for a, b in zip(rewards, rewards[1:])), dict(zip(LAMBDAS, rewards))


def test_dpo_is_more_polite_than_sft_and_equals_lambda_one(world, outputs):
    # lambda=1 mixes nothing in: token for token the DPO model alone.
    assert [o.token_ids for o in outputs["dera 1.0"]] == [o.token_ids for o in outputs["none"]]
    assert _mean_reward(world, outputs["none"]) > _mean_reward(world, outputs["dera 0.0"])


def test_aad_beats_greedy_dpo(world, outputs):
    aad = _mean_reward(world, outputs["aad 0.1"])
    dpo = _mean_reward(world, outputs["none"])
    assert aad > dpo, (aad, dpo)


_KNOWN_WORD = re.compile(r"[A-Za-z]+")


def test_answers_are_readable_and_finish(world, outputs):
    """No method degenerates: answers end with EOS and use the corpus's words."""
    vocab = {w.lower() for _, r in corpus.toy_corpus(2000, seed=0)
             for w in _KNOWN_WORD.findall(r)}
    for name, outs in outputs.items():
        finished = sum(o.finish_reason == "stop" for o in outs)
        assert finished == len(outs), (name, finished)
        words = [w.lower() for o in outs for w in _KNOWN_WORD.findall(o.text)]
        unknown = [w for w in words if w not in vocab]
        assert len(unknown) <= 0.01 * len(words), (name, unknown[:10])


# -- the shipped artefacts ----------------------------------------------------

def _toy_assets_tool():
    path = Path(__file__).resolve().parents[1] / "tools" / "toy_assets.py"
    spec = importlib.util.spec_from_file_location("toy_assets", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_shipped_world_and_agent_load_and_the_rebuild_check_compares_bytes(tmp_path):
    """The demo's and tests' default models are the shipped ones; `make toy-assets` compares a
    build with them file by file (here a copy stands in for a fresh build) and writes only
    where it is told."""
    from vllm_align.mara.agent import load_agent

    tool = _toy_assets_tool()
    world, agent = shipped.world(), shipped.agent()
    assert Path(world.sft_path).parent == shipped.ASSETS_DIR
    assert agent.model == Path(world.sft_path) and agent.stats["episodes"] == 2048
    assert load_agent(agent.trained, expected_hidden_size=128) is not None
    build, dest = tmp_path / "build", tmp_path / "dest"
    shutil.copytree(shipped.ASSETS_DIR, build)
    assert tool.main([str(build), "--write", str(dest)]) == 0
    assert sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file()) \
        == sorted(tool.SHIPPED)
    assert all((dest / name).read_bytes() == (shipped.ASSETS_DIR / name).read_bytes()
               for name in tool.SHIPPED)
    weights = build / "mara-agent" / "agent.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\0")
    lines = []
    assert tool.compare(build, log=lines.append) is False
    assert any(line.split() == ["DIFFERS", "mara-agent/agent.safetensors"] for line in lines)
    assert lines[-1].startswith("1 of 8 files differ")
