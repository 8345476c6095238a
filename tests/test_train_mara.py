"""``vllm-align train-mara`` and ``MaraTrainer`` end to end on a tiny local Llama.

* the CLI trains, writes an agent that ``load_agent`` serves, a metrics CSV
  and atomic checkpoints;
* a run killed with SIGKILL right after a checkpoint and then resumed ends
  exactly where the uninterrupted run ends (same agent bits, same metric rows):
  it lost only the work since that checkpoint;
* output directories are not silently reused, and a resume with other settings
  is refused naming the difference;
* ``--num-workers 2`` runs two Ray rollout actors feeding one learner.

Episodes roll out in a vLLM engine (``--rollout engine``, the default), the
actor installed in it as a MARA agent; ``test_engine_rollout.py`` checks those
transitions against the HF reference rollout.
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from vllm_align.cli.main import main
from vllm_align.mara.agent import load_agent
from vllm_align.train.config import SACConfig, TrainConfig

REPO = Path(__file__).resolve().parents[1]
REWARD = '''
def score(prompt, response):
    """Fraction of the response's characters that are vowels."""
    return sum(c in "aeiou" for c in response) / max(1, len(response))
'''


@pytest.fixture(scope="module")
def setup(tiny_pair, tmp_path_factory):
    root = tmp_path_factory.mktemp("train-mara")
    (root / "reward.py").write_text(REWARD)
    lines = ['{"prompt": "the old garden"}', '{"messages": [{"role": "user", "content": '
             '"tell me about the river"}]}', '{"prompt": "a quiet house", "id": "h"}',
             '{"prompt": "the teacher"}']
    (root / "prompts.jsonl").write_text("\n".join(lines) + "\n")
    return {"model": tiny_pair[1], "root": root, "reward": f"{root / 'reward.py'}:score",
            "prompts": str(root / "prompts.jsonl")}


def _args(setup, out: Path, *extra: str) -> list[str]:
    return ["train-mara", "--model", setup["model"], "--prompts", setup["prompts"],
            "--output-dir", str(out), "--reward", setup["reward"], "--episodes", "48",
            "--rollout-batch", "8", "--checkpoint-every", "16", "--batch-size", "32",
            "--learning-starts", "32", "--max-response-len", "10", "--threads", "1",
            "--save-replay", "--no-progress", "--log-every", "1000", "--seed", "3", *extra]


def _rows(out: Path) -> list[dict]:
    with open(out / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def _columns(rows: list[dict], skip=("elapsed_s",)) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in skip} for r in rows]


@pytest.fixture(scope="module")
def uninterrupted(setup):
    out = setup["root"] / "full"
    assert main(_args(setup, out)) == 0
    return out


def test_cli_trains_and_writes_a_servable_agent(setup, uninterrupted):
    out = uninterrupted
    agent = load_agent(out / "agent.safetensors", expected_hidden_size=256)
    final = out / "checkpoints" / "checkpoint-000000048"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "checkpoint-000000032", "checkpoint-000000048"]  # keep 2
    assert {p.name for p in final.iterdir()} == {"agent.safetensors", "trainer.pt", "replay.pt"}
    again = load_agent(final / "agent.safetensors")
    for k, v in agent.state_dict().items():
        assert torch.equal(v, again.state_dict()[k])
    state = torch.load(final / "trainer.pt", weights_only=True)
    assert set(state["sac"]) >= {"actor", "q1", "q2", "q1_target", "q2_target", "log_alpha",
                                 "actor_opt", "critic_opt", "alpha_opt", "num_updates"}
    assert state["counters"]["episodes"] == 48
    rows = _rows(out)
    assert [int(r["episodes"]) for r in rows] == list(range(8, 49, 8))
    last = rows[-1]
    assert int(last["updates"]) == state["sac"]["num_updates"] > 0
    for key in ("reward", "kl", "entropy", "critic_loss", "actor_loss", "accept_rate", "alpha"):
        assert last[key] != "", key
    assert 0.0 <= float(last["reward"]) <= 1.0


def test_killed_run_resumes_to_the_same_result(setup, uninterrupted):
    out = setup["root"] / "killed"
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    log = setup["root"] / "killed.log"
    # Its own process group: SIGKILL takes the trainer and its rollout engine's processes
    # down together, as a scheduler killing the job would.
    with open(log, "wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "vllm_align.cli.main",
                                 *_args(setup, out)], env=env, stdout=subprocess.DEVNULL,
                                stderr=err, start_new_session=True)
        first = out / "checkpoints" / "checkpoint-000000016"
        deadline = time.monotonic() + 300
        while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, log.read_text()[-2000:]
    done = sorted(p.name for p in (out / "checkpoints").iterdir()
                  if p.name.startswith("checkpoint-"))
    assert done and done[-1] < "checkpoint-000000048"  # killed mid-run

    # The same command again refuses to overwrite; --resume continues.
    assert main(_args(setup, out)) == 2
    assert main(_args(setup, out, "--resume")) == 0
    assert _columns(_rows(out)) == _columns(_rows(uninterrupted))
    a = load_agent(out / "agent.safetensors").state_dict()
    b = load_agent(uninterrupted / "agent.safetensors").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    sa = torch.load(out / "checkpoints" / "checkpoint-000000048" / "trainer.pt", weights_only=True)
    sb = torch.load(uninterrupted / "checkpoints" / "checkpoint-000000048" / "trainer.pt",
                    weights_only=True)
    for net in ("q1", "q2", "q1_target", "q2_target"):
        assert all(torch.equal(sa["sac"][net][k], sb["sac"][net][k]) for k in sa["sac"][net])


def test_resume_with_other_settings_is_refused(setup, uninterrupted, capsys):
    assert main(_args(setup, uninterrupted, "--resume", "--gamma", "0.5")) == 2
    err = capsys.readouterr().err
    assert "gamma: checkpoint 0.99, now 0.5" in err and err.count("\n") == 1


def test_cli_refuses_bad_values(setup, tmp_path, capsys):
    assert main(_args(setup, tmp_path / "o", "--tau", "0")) == 2
    assert "SACConfig.tau must be in (0, 1], got 0.0" in capsys.readouterr().err
    args = _args(setup, tmp_path / "o")
    args[args.index("--reward") + 1] = "no_such_module_xyz:fn"
    assert main(args) == 2
    assert "cannot import module 'no_such_module_xyz'" in capsys.readouterr().err  # the shared scorer's wording


def test_train_config_validation():
    base = dict(model="m", prompts="p.jsonl", output_dir="o", reward="mod:fn")
    assert TrainConfig(**base).validate().sac == SACConfig()  # table-6 defaults
    for field, value in [("rollout_batch", 0), ("checkpoint_every", -1), ("dtype", "fp8"),
                         ("threads", 0), ("save_replay", "yes"), ("prompts", [])]:
        with pytest.raises(ValueError, match=field) as info:
            TrainConfig(**{**base, field: value}).validate()
        assert repr(value) in str(info.value)
    with pytest.raises(ValueError, match="reward or a cost"):
        TrainConfig(**{**base, "reward": None}).validate()
    with pytest.raises(ValueError, match="SACConfig.gamma"):
        TrainConfig(**base, sac=SACConfig(gamma=2.0)).validate()
    fp = TrainConfig(**base).fingerprint()
    assert "training_episodes" not in fp["sac"] and fp["sac"]["kl_coef"] == 0.1


def test_ray_workers_feed_one_learner(setup, tmp_path):
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    try:
        out = tmp_path / "ray"
        assert main(_args(setup, out, "--num-workers", "2", "--episodes", "40")) == 0
    finally:
        ray.shutdown()
    rows = _rows(out)
    assert {r["worker"] for r in rows} == {"0", "1"}
    assert int(rows[-1]["episodes"]) == 40 and int(rows[-1]["updates"]) > 0
    load_agent(out / "agent.safetensors", expected_hidden_size=256)
    assert (out / "checkpoints" / "checkpoint-000000040" / "replay.pt").is_file()
