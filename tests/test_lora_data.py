"""The data tools on a LoRA pair: ``generate-pairs`` and ``sweep`` with ``--lora-adapter``,
through ``main(argv)``, and TRL's ``DPOTrainer`` with a PEFT ``LoraConfig`` on the pairs.

One engine for the whole module (the suite's budget): the first command's, started for
real from the ``EngineArgs`` its command line gave (``--enable-lora --max-lora-rank
--max-loras`` included); every later command must ask for the same engine arguments and
decodes on it (``build_llm`` is answered with it). The ``--replicas 2`` runs go through
``ReplicaPool``'s driver code and ``_Replica``'s decoding code with both "actors" run in
this process on that engine (no Ray: ``test_replicas.py`` runs real actors); so each
generate path (one engine, replicas, the sweep grid) is checked to carry the adapter.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from test_lora_pairs import RANK, make_adapter
from vllm_align.cli.main import main

N_PROMPTS = 6
MAX_TOKENS = 8
SEED = 3


@pytest.fixture(scope="module")
def base(tiny_pair) -> str:
    return tiny_pair[1]


@pytest.fixture(scope="module")
def files(base, tmp_path_factory):
    """Two adapters (dpo, other), the prompts and a reward file."""
    d = tmp_path_factory.mktemp("lora-data")
    prompts = d / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"the small house number {i} was"}) + "\n"
                               for i in range(N_PROMPTS)))
    reward = d / "reward.py"
    reward.write_text("def reward(prompt, response):\n    return float(len(response))\n")
    return SimpleNamespace(dir=d, prompts=prompts, reward=f"{reward}:reward",
                           dpo=make_adapter(base, d / "dpo", seed=21),
                           other=make_adapter(base, d / "other", seed=22))


def _engine_argv(base: str) -> list[str]:
    return ["--model", base, "--reference-model", base, "--enable-lora", "--max-lora-rank",
            str(RANK), "--max-loras", "1", "--seed", str(SEED), "--dtype", "float32",
            "--max-model-len", "256", "--block-size", "32", "--enforce-eager"]


def _pairs_argv(base, files, out, *adapter) -> list[str]:
    return ["generate-pairs", *_engine_argv(base), "--prompts", str(files.prompts),
            "--output", str(out), "--max-tokens", str(MAX_TOKENS), "--batch-size", "4",
            "--no-progress", *adapter]


def _sweep_argv(base, files, out: Path, *adapter) -> list[str]:
    return ["sweep", *_engine_argv(base), "--prompts", str(files.prompts),
            "--reward", files.reward, "--lambdas", "0,0.5,1", "--output", str(out / "s.csv"),
            "--responses-dir", str(out / "resp"), "--max-tokens", str(MAX_TOKENS),
            "--no-progress", *adapter]


@pytest.fixture(scope="module")
def engine():
    """{"llm": the module's engine, "args": the EngineArgs it was started from}."""
    from vllm_align.data import engine as data_engine

    real = data_engine.build_llm
    made: dict = {}

    def shared(**build):
        # By repr: some of vLLM's config objects compare by identity.
        args = {k: repr(v) for k, v in vars(build["engine_args"]).items()}
        if not made:
            made["args"] = args
            made["llm"] = real(**build)
        assert args == made["args"]
        return made["llm"]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(data_engine, "build_llm", shared)
        yield made
    made.clear()


@pytest.fixture(scope="module")
def pairs(base, files, engine):
    out = files.dir / "pairs.jsonl"
    assert main(_pairs_argv(base, files, out, "--lora-adapter", f"dpo={files.dpo}")) == 0
    return out


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _lora(name, path):
    from vllm.lora.request import LoRARequest

    return LoRARequest(name, 1, path)


def test_engine_is_vllms_lora_engine_from_the_command_line(pairs, engine):
    lora = engine["llm"].llm_engine.vllm_config.lora_config
    assert lora is not None and lora.max_lora_rank == RANK and lora.max_loras == 1


def test_pairs_from_an_adapter_are_the_offline_api_with_its_lora_request(pairs, engine,
                                                                         files, base):
    from vllm import SamplingParams

    recs = _records(pairs)
    assert [r["id"] for r in recs] == list(range(N_PROMPTS))
    for r in recs:
        assert r["lora_adapter"] == {"name": "dpo", "path": files.dpo}
        assert r["model"] == base and r["reference_model"] == base
    prompts = [r["prompt"] for r in recs]
    seeds = [SEED + i for i in range(N_PROMPTS)]

    def decode(spec, temperature, top_p, lora):
        params = [SamplingParams(max_tokens=MAX_TOKENS, temperature=temperature, top_p=top_p,
                                 seed=s, extra_args={"align": spec}) for s in seeds]
        outs = engine["llm"].generate(prompts, params, lora_request=lora, use_tqdm=False)
        return [o.outputs[0].text for o in outs]

    dpo = _lora("dpo", files.dpo)
    # generate-pairs' default sides: AAD alpha 0.1 greedy; the aligned model, p 0.9, T 1.
    assert [r["chosen"] for r in recs] == decode({"method": "aad", "alpha": 0.1}, 0.0, 1.0, dpo)
    assert [r["rejected"] for r in recs] == decode({"method": "none"}, 1.0, 0.9, dpo)
    # The adapter is the aligned model: without it the same seeded draws differ.
    assert [r["rejected"] for r in recs] != decode({"method": "none"}, 1.0, 0.9, None)


class _Done:
    """A finished "object ref"."""

    def __init__(self, value):
        self.value = value


class _Actor:
    """A replica run in this process: ``actor.method.remote(*args)`` runs at once."""

    def __init__(self, replica):
        self.replica = replica

    def __getattr__(self, name):
        method = getattr(self.replica, name)
        return SimpleNamespace(remote=lambda *args: _Done(method(*args)))


_RAY = SimpleNamespace(wait=lambda refs, num_returns: (refs[:num_returns], refs[num_returns:]),
                       get=lambda ref: [r.value for r in ref] if isinstance(ref, list)
                       else ref.value)


@pytest.fixture
def local_replicas():
    """``--replicas N``: ``ReplicaPool`` with N in-process ``_Replica``s on the module's
    engine (each started through ``_Replica.start``, i.e. ``build_llm``)."""
    from vllm_align.data import replicas

    class LocalPool(replicas.ReplicaPool):
        def __init__(self, n, build, *, ray_address=None):
            replica = replicas._Replica()
            self.max_num_seqs = [replica.start(build, {})] * n
            self.actors = [_Actor(replica) for _ in range(n)]

        def close(self):
            pass

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(replicas, "ReplicaPool", LocalPool)
        mp.setitem(sys.modules, "ray", _RAY)
        yield


def test_pairs_on_replicas_carry_the_adapter(pairs, base, files, local_replicas, tmp_path):
    out = tmp_path / "replicas.jsonl"
    argv = _pairs_argv(base, files, out, "--lora-adapter", f"dpo={files.dpo}",
                       "--replicas", "2", "--batch-size", "1")
    assert main(argv) == 0
    assert out.read_bytes() == pairs.read_bytes()


def test_resume_with_another_adapter_or_none_is_refused(pairs, base, tiny_pair, files, tmp_path,
                                                        capsys):
    """No engine starts: the output is checked first."""
    ours = f"lora_adapter={ {'name': 'dpo', 'path': files.dpo}!r}"
    out = tmp_path / "resume.jsonl"

    def refused(argv, records) -> str:
        out.write_text("".join(json.dumps(r) + "\n" for r in records))
        assert main(argv) == 2
        assert out.read_text() == "".join(json.dumps(r) + "\n" for r in records)
        return capsys.readouterr().err

    recs = _records(pairs)
    other = f"lora_adapter={ {'name': 'other', 'path': files.other}!r}"
    err = refused(_pairs_argv(base, files, out, "--lora-adapter", files.other), recs)
    assert ours in err and f"this run has {other}" in err
    # An output made without an adapter, resumed with one.
    err = refused(_pairs_argv(base, files, out, "--lora-adapter", f"dpo={files.dpo}"),
                  [{**r, "lora_adapter": None} for r in recs])
    assert "with lora_adapter=None" in err and f"this run has {ours}" in err
    # One made with an adapter (against another reference), resumed without one.
    argv = _pairs_argv(base, files, out)
    argv[argv.index("--reference-model") + 1] = tiny_pair[0]
    err = refused(argv, [{**r, "reference_model": tiny_pair[0]} for r in recs])
    assert f"with {ours}" in err and "this run has lora_adapter=None" in err


def test_adapter_flags_are_checked_before_the_engine_starts(base, files, tmp_path, capsys):
    out = tmp_path / "x.jsonl"
    argv = _pairs_argv(base, files, out, "--lora-adapter", files.dpo)
    no_lora = [a for a in argv if a != "--enable-lora"]
    assert main(no_lora) == 2
    assert f"--lora-adapter dpo={files.dpo} needs vLLM's LoRA engine: add --enable-lora" in (
        capsys.readouterr().err)
    small = list(argv)
    small[small.index("--max-lora-rank") + 1] = "1"
    assert main(small) == 2
    assert f"has rank {RANK}, above --max-lora-rank 1" in capsys.readouterr().err
    assert main(argv[:-2] + ["--lora-adapter", "dpo=" + str(tmp_path)]) == 2
    assert "is not a peft adapter directory (no adapter_config.json)" in capsys.readouterr().err
    # A LoRA pair without an adapter: its aligned model would be its reference.
    assert main(argv[:-2]) == 2
    assert "'aad' on a LoRA pair (--reference-model is --model) needs an adapter" in (
        capsys.readouterr().err)
    sweep = _sweep_argv(base, files, tmp_path)
    assert main(sweep) == 2
    assert "a LoRA pair, whose aligned model is an adapter on it; give --lora-adapter" in (
        capsys.readouterr().err)
    assert not out.exists() and not (tmp_path / "s.csv").exists()


@pytest.fixture(scope="module")
def sweep(base, files, engine, pairs):
    out = files.dir / "sweep"
    assert main(_sweep_argv(base, files, out, "--lora-adapter", f"dpo={files.dpo}")) == 0
    return out


def test_sweep_of_lambda_for_an_adapter(sweep, engine, files):
    from vllm import SamplingParams

    def decode(prompts, spec, lora):
        outs = engine["llm"].generate(prompts, SamplingParams(
            max_tokens=MAX_TOKENS, temperature=0, extra_args={"align": spec}),
            lora_request=lora, use_tqdm=False)
        return [o.outputs[0].text for o in outs]

    dpo = _lora("dpo", files.dpo)
    got = {}
    for lam in (0, 0.5, 1):
        recs = _records(sweep / "resp" / f"dera_lambda={lam:g}.jsonl")
        assert all(r["lora_adapter"] == {"name": "dpo", "path": files.dpo} for r in recs)
        prompts = [r["prompt"] for r in recs]
        got[lam] = [r["response"] for r in recs]
        assert got[lam] == decode(prompts, {"method": "dera", "lambda": lam}, dpo), lam
    # lambda 0 is the base, lambda 1 the base plus the adapter, and they differ.
    assert got[0] == decode(prompts, {"method": "none"}, None)
    assert got[1] == decode(prompts, {"method": "none"}, dpo)
    assert got[0] != got[1]
    rows = (sweep / "s.csv").read_text().splitlines()
    assert [r.split(",")[:3] for r in rows[1:]] == [["dera", p, str(N_PROMPTS)]
                                                    for p in ("0.0", "0.5", "1.0")]


def test_sweep_on_replicas_carries_the_adapter(sweep, base, files, local_replicas, tmp_path):
    argv = _sweep_argv(base, files, tmp_path, "--lora-adapter", f"dpo={files.dpo}",
                       "--replicas", "2")
    assert main(argv) == 0
    assert (tmp_path / "s.csv").read_text() == (sweep / "s.csv").read_text()
    for f in sorted((sweep / "resp").iterdir()):
        assert (tmp_path / "resp" / f.name).read_text() == f.read_text(), f.name


def test_trl_dpo_trainer_with_a_peft_lora_config_trains_on_the_pairs(pairs, base, tmp_path):
    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    torch.manual_seed(0)
    data = load_dataset("json", data_files=str(pairs), split="train")
    args = DPOConfig(output_dir=str(tmp_path / "dpo"), max_steps=3, learning_rate=1e-2,
                     per_device_train_batch_size=2, logging_steps=1, report_to="none",
                     save_strategy="no", use_cpu=True, max_length=64, dataloader_num_workers=0)
    trainer = DPOTrainer(model=AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                         args=args, train_dataset=data,
                         processing_class=AutoTokenizer.from_pretrained(base),
                         peft_config=LoraConfig(r=4, lora_alpha=8,
                                                target_modules=["q_proj", "v_proj"]))

    def adapter_weights():
        return {n: p.detach().clone() for n, p in trainer.model.named_parameters()
                if "lora_" in n}

    before = adapter_weights()
    assert before and all(p.requires_grad for n, p in trainer.model.named_parameters()
                          if "lora_" in n)
    result = trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses), losses
    assert math.isfinite(result.training_loss)
    after = adapter_weights()
    assert any(not torch.equal(before[n], after[n]) for n in before)
    # Only the adapter trains: the base's weights are left as they were.
    frozen = [p for n, p in trainer.model.named_parameters() if "lora_" not in n]
    assert frozen and not any(p.requires_grad for p in frozen)
