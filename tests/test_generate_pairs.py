"""`vllm-align generate-pairs` through `main(argv)`, and a run killed with SIGKILL.

Three engines in all: the uninterrupted baseline (in-process), a subprocess
killed mid-run, and its resumption (in-process).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vllm_align.cli.main import main

REPO = Path(__file__).resolve().parents[1]
N_PROMPTS = 48
CHAT_ID = "chat-7"
MAX_TOKENS = 12


def _write_prompts(path: Path) -> None:
    with open(path, "w") as f:
        for i in range(N_PROMPTS):
            if i == 7:
                f.write(json.dumps({"id": CHAT_ID, "messages": [
                    {"role": "user", "content": "Tell me about gardens."}]}) + "\n")
            else:
                f.write(json.dumps({"prompt": f"the small house number {i} was"}) + "\n")


def _argv(pair, prompts: Path, out: Path, batch_size: int) -> list[str]:
    aligned, reference = pair
    return ["generate-pairs", "--model", str(aligned), "--reference-model", str(reference),
            "--prompts", str(prompts), "--output", str(out), "--max-tokens", str(MAX_TOKENS),
            "--seed", "3", "--batch-size", str(batch_size), "--dtype", "float32",
            "--max-model-len", "256", "--enforce-eager", "--no-progress"]


def _records(path: Path) -> list[dict]:
    data = path.read_bytes()
    assert data.endswith(b"\n")
    return [json.loads(line) for line in data.decode().splitlines()]


def _ids() -> list:
    return [CHAT_ID if i == 7 else i for i in range(N_PROMPTS)]


@pytest.fixture(scope="module")
def run(tiny_pair, tmp_path_factory):
    """An uninterrupted run: (pair, prompts path, output path)."""
    d = tmp_path_factory.mktemp("pairs")
    prompts, out = d / "prompts.jsonl", d / "baseline.jsonl"
    _write_prompts(prompts)
    assert main(_argv(tiny_pair, prompts, out, batch_size=16)) == 0
    return tiny_pair, prompts, out


def test_output_is_trl_dpo_format_with_metadata(run):
    (aligned, reference), _, out = run
    recs = _records(out)
    assert [r["id"] for r in recs] == _ids()
    for i, r in enumerate(recs):
        assert isinstance(r["prompt"], str) and isinstance(r["chosen"], str)
        assert isinstance(r["rejected"], str) and r["chosen"] and r["rejected"]
        assert r["chosen_spec"] == {"method": "aad", "alpha": 0.1,
                                    "temperature": 0.0, "top_p": 1.0}
        assert r["rejected_spec"] == {"method": "none", "temperature": 1.0, "top_p": 0.9}
        assert r["seed"] == 3 + i
        assert r["model"] == str(aligned) and r["reference_model"] == str(reference)
        assert r["max_tokens"] == MAX_TOKENS
    assert recs[0]["prompt"] == "the small house number 0 was"
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(aligned)
    assert recs[7]["prompt"] == tok.apply_chat_template(
        [{"role": "user", "content": "Tell me about gardens."}], tokenize=False,
        add_generation_prompt=True)
    # Sampled rejections differ from the greedy AAD choices somewhere.
    assert any(r["chosen"] != r["rejected"] for r in recs)


def test_resume_skips_done_prompts_and_repairs_torn_line(run, tmp_path, capsys):
    pair, prompts, baseline = run
    lines = baseline.read_bytes().splitlines(keepends=True)
    first = json.loads(lines[0])
    first["chosen"] = "SENTINEL"            # a done record must be kept, not regenerated
    out = tmp_path / "out.jsonl"
    out.write_bytes(json.dumps(first).encode() + b"\n" + b"".join(lines[1:])
                    + lines[2] + b'{"id": 5, "prompt": "the sm')   # a duplicate, a torn tail
    # Everything is done: no engine starts; the file is repaired.
    assert main(_argv(pair, prompts, out, batch_size=16)) == 0
    recs = _records(out)
    assert [r["id"] for r in recs] == _ids()
    assert recs[0]["chosen"] == "SENTINEL"
    assert recs[1:] == _records(baseline)[1:]
    assert "already have pairs" in capsys.readouterr().err


def test_bad_spec_and_mismatched_output_are_refused(run, tmp_path, capsys):
    pair, prompts, baseline = run
    argv = _argv(pair, prompts, tmp_path / "x.jsonl", batch_size=4)
    assert main(argv + ["--chosen", '{"method": "aad", "alpha": 2}']) == 2
    assert "'alpha' must be in (0, 1], got 2.0" in capsys.readouterr().err
    assert main(argv + ["--rejected", '{"method": "none", "top_p": 0}']) == 2
    assert "--rejected 'top_p' must be in (0, 1], got 0.0" in capsys.readouterr().err
    # An existing output made with other settings is not extended.
    out = tmp_path / "other.jsonl"
    out.write_bytes(baseline.read_bytes())
    argv = _argv(pair, prompts, out, batch_size=4)
    assert main(argv + ["--chosen", '{"method": "dera", "lambda": 2}']) == 2
    assert "chosen_spec" in capsys.readouterr().err
    assert not (tmp_path / "x.jsonl").exists()


def _live_group_members(pgid: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if fields[0] != "Z" and int(fields[2]) == pgid:
            pids.append(int(entry))
    return pids


def test_sigkill_mid_run_then_resume_gives_one_record_per_prompt(run, tmp_path):
    pair, prompts, baseline = run
    out = tmp_path / "killed.jsonl"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(REPO), os.environ.get("PYTHONPATH", "")]), "VLLM_CPU_KVCACHE_SPACE": "1"}
    # 4 sequences at a time: the records come out over many engine steps, so the
    # kill lands while they are being written (the engine would otherwise run
    # all 96 requests at once and finish them together).
    argv = _argv(pair, prompts, out, batch_size=2) + ["--max-num-seqs", "4"]
    with open(tmp_path / "child.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "vllm_align.cli.main", *argv],
                                env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    pgid = proc.pid
    try:
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline and proc.poll() is None:
            if out.exists() and b"\n" in out.read_bytes():
                time.sleep(random.uniform(0.0, 0.2))   # then anywhere in the next batches
                break
            time.sleep(0.005)
        assert proc.poll() is None, (
            "the run ended before it could be killed:\n"
            + (tmp_path / "child.log").read_text()[-3000:])
        os.killpg(pgid, signal.SIGKILL)
    finally:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
    # A killed process is gone once the kernel has freed its memory: seconds, or much
    # longer on a machine that is swapping (seen with two engines per test worker).
    deadline = time.monotonic() + 60
    while _live_group_members(pgid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _live_group_members(pgid), "engine processes survived the kill"

    partial = out.read_bytes()
    complete = partial[:partial.rindex(b"\n") + 1]
    n_partial = complete.count(b"\n")
    print(f"killed with {n_partial} complete records, torn tail: {len(partial) - len(complete)} bytes")
    assert 1 <= n_partial < N_PROMPTS

    assert main(argv) == 0                           # resume, in-process
    data = out.read_bytes()
    assert data.startswith(complete)                 # done records kept as they were
    recs = _records(out)
    assert sorted(map(str, (r["id"] for r in recs))) == sorted(map(str, _ids()))
    assert len(recs) == N_PROMPTS
    # The same records as the uninterrupted run (other batches, same per-prompt seeds).
    by_id = {r["id"]: r for r in recs}
    assert [by_id[i] for i in _ids()] == _records(baseline)
