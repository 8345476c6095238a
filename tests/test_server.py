"""The real `vllm serve --sampler align` on loopback, through the `openai` client."""

import subprocess
import sys
from pathlib import Path

import openai
import pytest
import requests

from serving import (MAX_TOKENS, PROMPT, STARTUP_S, agent_file as _agent, client as _client,
                     complete as _complete, ids as _ids, start as _start, stop as _stop)


@pytest.fixture(scope="module")
def greedy_ids(tiny_pair):
    from serving import hf_greedy_ids

    return hf_greedy_ids(tiny_pair)


def test_alignment_field_selects_the_rule(align_server, greedy_ids):
    url, model, _ = align_server
    client = _client(url)
    assert _ids(_complete(client, model, {"method": "none"})) == greedy_ids["aligned"]
    assert _ids(_complete(client, model, {"method": "dera", "lambda": 1.0})) == greedy_ids["aligned"]
    assert _ids(_complete(client, model, {"method": "dera", "lambda": 0.0})) == greedy_ids["reference"]
    assert greedy_ids["aligned"] != greedy_ids["reference"]


def test_default_applies_without_field(align_server, greedy_ids):
    url, model, _ = align_server
    # --align-default is DeRa lambda=0: the reference model's greedy output.
    assert _ids(_complete(_client(url), model)) == greedy_ids["reference"]


def test_chat_and_streaming(align_server):
    url, model, _ = align_server
    client = _client(url)
    messages = [{"role": "user", "content": PROMPT}]

    def chat(alignment, **kw):
        return client.chat.completions.create(
            model=model, messages=messages, max_tokens=MAX_TOKENS, temperature=0,
            extra_body={"alignment": alignment, "ignore_eos": True}, **kw)

    aad = {"method": "aad", "alpha": 0.1}
    whole = chat(aad).choices[0].message.content
    streamed = "".join(c.choices[0].delta.content or "" for c in chat(aad, stream=True)
                       if c.choices)
    assert whole and whole == streamed
    assert whole != chat({"method": "none"}).choices[0].message.content

    dera = {"method": "dera", "lambda": 2.0}
    full = _complete(client, model, dera).choices[0].text
    parts = client.completions.create(model=model, prompt=PROMPT, max_tokens=MAX_TOKENS,
                                      temperature=0, stream=True,
                                      extra_body={"alignment": dera, "ignore_eos": True})
    assert "".join(p.choices[0].text for p in parts) == full


@pytest.mark.parametrize("alignment, message", [
    ({"method": "beam"}, "unknown alignment method 'beam'"),
    ({"method": "dera", "lambda": 0.5, "temperature": 1}, "unknown alignment key"),
    ({"method": "dera", "lambda": "0.5"}, "must be a number"),
    ({"method": "aad", "alpha": 0.0}, "(0, 1]"),
    ({"method": "aad", "alpha": 1.5}, "(0, 1]"),
])
def test_bad_alignment_is_400_and_server_keeps_serving(align_server, alignment, message):
    url, model, _ = align_server
    client = _client(url)
    with pytest.raises(openai.BadRequestError) as err:
        _complete(client, model, alignment)
    assert err.value.status_code == 400
    assert message in str(err.value)
    assert _complete(client, model, {"method": "none"}).choices[0].text


@pytest.mark.parametrize("value", ["NaN", "Infinity", "1e999"])
def test_non_finite_lambda_is_400(align_server, value):
    # The openai client refuses to send NaN, so post the raw JSON body.
    url, model, _ = align_server
    body = ('{"model": "%s", "prompt": "hi", "max_tokens": 2, '
            '"alignment": {"method": "dera", "lambda": %s}}' % (model, value))
    resp = requests.post(url + "/v1/completions", data=body,
                         headers={"content-type": "application/json"}, timeout=60)
    assert resp.status_code == 400
    assert "must be finite" in resp.json()["error"]["message"]


def test_mara_served_without_reference_with_metrics(tiny_pair, tmp_path):
    """An engine with an agent and no reference: MARA served, DeRa/AAD refused per request."""
    sys.path.insert(0, str(Path(__file__).parent))
    import hf_mara_reference
    from transformers import AutoTokenizer

    aligned, _ = tiny_pair
    agent, path = _agent(tiny_pair, tmp_path / "agent.pth")
    proc, url = _start([aligned, "--sampler", "align", "--mara-agent", f"polite={path}"],
                       tmp_path / "serve.log")
    try:
        client = _client(url)
        got = _ids(_complete(client, aligned, {"method": "mara", "agent": "polite", "top_k": 5}))
        prompt = AutoTokenizer.from_pretrained(aligned)(PROMPT).input_ids
        steps = hf_mara_reference.mara_greedy_decode(
            hf_mara_reference.load_model(aligned), agent, prompt, max_new_tokens=MAX_TOKENS,
            top_k=5)
        assert got == hf_mara_reference.tokens(steps)
        for alignment, message in (({"method": "aad", "alpha": 0.1}, "reference model"),
                                   ({"method": "mara"}, "unknown MARA agent 'default'")):
            with pytest.raises(openai.BadRequestError) as err:
                _complete(client, aligned, alignment)
            assert message in str(err.value)
        assert _complete(client, aligned).choices[0].text

        metrics = requests.get(url + "/metrics", timeout=10).text
        def value(name: str) -> float:
            line = next(l for l in metrics.splitlines() if l.startswith(name + " "))
            return float(line.split()[-1])
        assert value("vllm_align:mara_tokens_total") == MAX_TOKENS
        assert value("vllm_align:mara_candidates_evaluated_total") == sum(
            len(s.accept_probs) for s in steps)
        first = sum(s.chosen_index == 0 for s in steps)
        assert value('vllm_align:mara_accepted_position_total{position="0"}') == first
    finally:
        _stop(proc)


def test_agent_of_another_width_refuses_to_start_with_one_line(tiny_pair, tmp_path):
    _, path = _agent(tiny_pair, tmp_path / "wide.safetensors", width_delta=64)
    vllm = str(Path(sys.executable).with_name("vllm"))
    done = subprocess.run([vllm, "serve", tiny_pair[0], "--sampler", "align",
                           "--mara-agent", path], capture_output=True, text=True,
                          timeout=STARTUP_S)
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("vllm-align: refusing to start: MARA agent")
    from transformers import AutoConfig

    hidden = AutoConfig.from_pretrained(tiny_pair[0]).hidden_size
    assert f"hidden size {hidden + 64}" in last and f"hidden size is {hidden}" in last
    assert "Traceback" not in done.stderr


def test_incompatible_pair_refuses_to_start_with_one_line(tiny_pair, tmp_path):
    from vllm_align.toy.models import build_llama_pair

    _, other_vocab = build_llama_pair(tmp_path / "other", vocab_size=512, seed=1)
    vllm = str(Path(sys.executable).with_name("vllm"))
    done = subprocess.run([vllm, "serve", tiny_pair[0], "--sampler", "align",
                           "--reference-model", other_vocab], capture_output=True,
                          text=True, timeout=STARTUP_S)
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("vllm-align: refusing to start: vocabulary size mismatch")
    assert "Traceback" not in done.stderr
