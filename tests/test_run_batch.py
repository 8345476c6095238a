"""OpenAI batch files: `vllm run-batch --sampler align` with an `alignment` object per body.

One run of the real command over a file of chat bodies, one per method of the mixed
batch plus one with a bad alignment: every good line gives the plain HF decoders'
tokens, the bad one is answered 400 alone. (vLLM 0.32's run-batch validates the
whole file first and accepts `/v1/chat/completions`, `/v1/embeddings`, `.../score`,
`.../rerank` and `/v1/audio/...` bodies; a `/v1/completions` line fails the whole run.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from serving import MAX_TOKENS, MIXED, PROMPT, agent_file, reference_tokens

BAD = {"method": "aad", "alpha": 2.0}


@pytest.fixture(scope="module")
def batch(tiny_pair, tmp_path_factory):
    """(agent, {custom_id: output line}) of one `vllm run-batch` run."""
    aligned, reference = tiny_pair
    tmp = tmp_path_factory.mktemp("run-batch")
    agent, agent_path = agent_file(tiny_pair, tmp / "agent.safetensors")
    lines = [{"custom_id": f"req-{i}", "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": aligned, "messages": [{"role": "user", "content": PROMPT}],
                       "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True,
                       "return_token_ids": True, "alignment": spec}}
             for i, spec in enumerate([*MIXED, BAD])]
    (tmp / "in.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    vllm = str(Path(sys.executable).with_name("vllm"))
    cmd = [vllm, "run-batch", "-i", str(tmp / "in.jsonl"), "-o", str(tmp / "out.jsonl"),
           "--model", aligned, "--sampler", "align", "--reference-model", reference,
           "--mara-agent", agent_path, "--dtype", "float32", "--max-model-len", "256",
           "--enforce-eager"]
    with open(tmp / "run.log", "w") as log:
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, timeout=300,
                            env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}).returncode
    assert rc == 0, (tmp / "run.log").read_text()[-3000:]
    outputs = [json.loads(line) for line in (tmp / "out.jsonl").read_text().splitlines()]
    return agent, {o["custom_id"]: o for o in outputs}


def test_each_line_is_decoded_by_its_alignment(batch, tiny_pair):
    agent, outputs = batch
    bodies = [outputs[f"req-{i}"]["response"]["body"] for i in range(len(MIXED))]
    assert all(outputs[f"req-{i}"]["response"]["status_code"] == 200 for i in range(len(MIXED)))
    prompt = bodies[0]["prompt_token_ids"]
    assert all(b["prompt_token_ids"] == prompt for b in bodies)
    got = [list(b["choices"][0]["token_ids"]) for b in bodies]
    assert got == reference_tokens(tiny_pair, agent, prompt)
    assert len({tuple(ids) for ids in got}) > 1


def test_bad_alignment_fails_its_line_alone(batch):
    _, outputs = batch
    bad = outputs[f"req-{len(MIXED)}"]
    assert bad["response"]["status_code"] == 400, bad
    assert "(0, 1]" in json.dumps(bad)
