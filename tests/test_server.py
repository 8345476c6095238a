"""The real `vllm serve --sampler align` on loopback, through the `openai` client.

Most tests share one server (``align_server`` in conftest: a reference model and a
MARA agent, a 64-token step budget). Nothing a client sends may take it down:
every malformed ``alignment`` object in the fuzz below must be answered 400 naming
the field (or 200 where it is valid), never 5xx, never a hang; afterwards the
engine must still give the reference decoders' tokens. Seeded requests whose
prompts are prefilled in chunks reproduce.
"""

import json
import math
import random
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
import requests

from serving import (MAX_TOKENS, PROMPT, STARTUP_S, agent_file as _agent, client as _client,
                     complete as _complete, hf_greedy_ids, ids as _ids, start as _start,
                     stop as _stop)


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
    proc, url = _start([aligned, "--sampler", "align", "--mara-agent", f"polite={path}",
                        "--enforce-eager"], tmp_path / "serve.log")
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


# -- robustness: fuzzed alignment objects, seeded requests ------------------

TIMEOUT_S = 60
DEEP = 400  # nesting depth of the deep cases (Python's json recursion limit is ~1000)

# (alignment value as JSON text, expected status). 400 = refused alone.
CASES = [
    # not an object
    ("null", 200), ("0", 400), ("1.5", 400), ('"dera"', 400), ("[]", 400), ("[1, 2]", 400),
    ("true", 400), ('"{\\"method\\": \\"none\\"}"', 200), ('"{bad json"', 400),
    ('"' + "[" * DEEP + '"', 400), ('"' + "[" * 5000 + '"', 400), ("{}", 400),
    # methods with odd spelling or type
    ('{"method": null}', 400), ('{"method": 5}', 400), ('{"method": ["dera"]}', 400),
    ('{"method": {"dera": 1}}', 400), ('{"method": "DERA"}', 400), ('{"method": " dera"}', 400),
    ('{"method": "dera "}', 400), ('{"method": "d\\u0435ra"}', 400), ('{"method": ""}', 400),
    ('{"method": "none", "method2": 1}', 400), ('{"Method": "none"}', 400),
    # lambda: non-finite, beyond float32 or the mixing bound, wrong types
    ('{"method": "dera", "lambda": NaN}', 400), ('{"method": "dera", "lambda": Infinity}', 400),
    ('{"method": "dera", "lambda": -Infinity}', 400), ('{"method": "dera", "lambda": 1e308}', 400),
    ('{"method": "dera", "lambda": -1e308}', 400), ('{"method": "dera", "lambda": 3.5e38}', 400),
    ('{"method": "dera", "lambda": 1e39}', 400), ('{"method": "dera", "lambda": 1000001}', 400),
    ('{"method": "dera", "lambda": ' + "9" * 400 + "}", 400),
    ('{"method": "dera", "lambda": 1e6}', 200), ('{"method": "dera", "lambda": -1e6}', 200),
    ('{"method": "dera", "lambda": 1e-320}', 200), ('{"method": "dera", "lambda": -0.0}', 200),
    ('{"method": "dera", "lambda": "0.5"}', 400), ('{"method": "dera", "lambda": [0.5]}', 400),
    ('{"method": "dera", "lambda": {"v": 0.5}}', 400), ('{"method": "dera", "lambda": true}', 400),
    ('{"method": "dera", "lambda": null}', 400),
    ('{"method": "dera", "lambda": ' + "[" * DEEP + "]" * DEEP + "}", 400),
    ('{"method": "dera", "lambda": 0.5, "alpha": 0.1}', 400),
    # alpha and tau
    ('{"method": "aad", "alpha": 0}', 400), ('{"method": "aad", "alpha": -0.0}', 400),
    ('{"method": "aad", "alpha": 1e-300}', 400), ('{"method": "aad", "alpha": 5e-324}', 400),
    ('{"method": "aad", "alpha": 1e-45}', 400), ('{"method": "aad", "alpha": 1.0000001}', 400),
    ('{"method": "aad", "alpha": NaN}', 400), ('{"method": "aad", "alpha": 1}', 200),
    ('{"method": "aad", "alpha": 1e-30}', 200),
    ('{"method": "aad", "entropy_threshold": 1e300}', 400),
    ('{"method": "aad", "entropy_threshold": -1}', 400),
    ('{"method": "aad", "entropy_threshold": Infinity}', 400),
    ('{"method": "aad", "entropy_threshold": null}', 200),
    ('{"method": "aad", "entropy_threshold": 1e38}', 200),
    # MARA
    ('{"method": "mara", "top_k": ' + str(10 ** 30) + "}", 400),
    ('{"method": "mara", "top_k": 2147483648}', 400), ('{"method": "mara", "top_k": 1e9}', 400),
    ('{"method": "mara", "top_k": 2147483647}', 200), ('{"method": "mara", "top_k": 1000000}', 200),
    ('{"method": "mara", "top_k": 0}', 400), ('{"method": "mara", "top_k": -1}', 400),
    ('{"method": "mara", "top_p": 1e-300}', 400), ('{"method": "mara", "top_p": 5e-324}', 400),
    ('{"method": "mara", "top_p": 1e-30}', 200), ('{"method": "mara", "threshold": 1}', 400),
    ('{"method": "mara", "threshold": 0}', 200), ('{"method": "mara", "agent": ""}', 400),
    ('{"method": "mara", "agent": " default"}', 400), ('{"method": "mara", "agent": "a=b"}', 400),
    ('{"method": "mara", "agent": 5}', 400), ('{"method": "mara", "agent": "nope"}', 400),
    ('{"method": "mara", "fallback": "LAST"}', 400), ('{"method": "mara", "decisions": "Greedy"}', 400),
    ('{"method": "mara", "decisions": "sampled", "top_k": 100000}', 200),
]


def _junk(rng: random.Random, depth: int = 0):
    """A random JSON value: the shapes a confused or hostile client might send."""
    kinds = ["int", "float", "str", "bool", "null", "special"] + (["list", "dict"] * (depth < 4))
    kind = rng.choice(kinds)
    if kind == "int":
        return rng.choice([0, 1, -1, 40, 2 ** 31, 2 ** 63, -(2 ** 64), 10 ** rng.randrange(1, 60)])
    if kind == "float":
        return rng.choice([0.5, -0.0, 1e-320, 1e-45, 3.4e38, 3.5e38, 1e308]) * rng.choice([1, -1])
    if kind == "str":
        return rng.choice(["", "dera", "aad", "mara", "none", "MARA", "default", "x" * 1000, "\u0000"])
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "null":
        return None
    if kind == "special":
        return rng.choice([math.nan, math.inf, -math.inf])
    if kind == "list":
        return [_junk(rng, depth + 1) for _ in range(rng.randrange(3))]
    keys = ["method", "lambda", "alpha", "entropy_threshold", "agent", "top_k", "top_p",
            "threshold", "fallback", "decisions", "extra"]
    return {rng.choice(keys): _junk(rng, depth + 1) for _ in range(rng.randrange(1, 4))}


def _random_cases(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        value = _junk(rng)
        if rng.random() < 0.7:  # mostly objects with a real method name
            value = {"method": rng.choice(["none", "dera", "aad", "mara"]),
                     **(value if isinstance(value, dict) else {"x": value})}
        out.append(json.dumps(value))  # NaN/Infinity as the JSON extensions Python emits
    return out


def _post(url: str, path: str, body: str) -> requests.Response:
    return requests.post(url + path, data=body.encode(), timeout=TIMEOUT_S,
                         headers={"content-type": "application/json"})


def _body(model: str, alignment: str, chat: bool) -> str:
    if chat:
        head = '{"model": "%s", "messages": [{"role": "user", "content": "hi"}]' % model
    else:
        head = '{"model": "%s", "prompt": "hi"' % model
    return head + ', "max_tokens": 2, "alignment": ' + alignment + "}"


def _check(resp: requests.Response, alignment: str, expected: int | None) -> None:
    assert resp.status_code < 500, (alignment[:200], resp.status_code, resp.text[:500])
    if expected is not None:
        assert resp.status_code == expected, (alignment[:200], resp.text[:500])
    if resp.status_code == 400:
        assert "alignment" in resp.json()["error"]["message"], (alignment[:200], resp.text[:500])


def test_fuzzed_alignment_never_takes_the_server_down(align_server, tiny_pair):
    url, model, proc = align_server
    table = [(a, status, chat) for a, status in CASES for chat in (False, True)]
    fuzzed = [(a, None, i % 2 == 1) for i, a in enumerate(_random_cases(120))]
    # Concurrently, 8 at a time: refused requests share engine steps with valid ones.
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(
            lambda case: (_post(url, "/v1/chat/completions" if case[2] else "/v1/completions",
                                _body(model, case[0], case[2])), case),
            table + fuzzed))
    for resp, (alignment, expected, _) in responses:
        _check(resp, alignment, expected)
    assert any(r.status_code == 200 for r, case in responses[len(table):])  # some fuzz is valid

    # Malformed bodies are vLLM's own 4xx.
    for body in ['{"model": "%s", "prompt": "hi", "alignment": {"method": "dera"' % model,
                 "not json at all", "", "[]", '{"prompt": ' + "[" * 3000 + "]" * 3000 + "}"]:
        assert _post(url, "/v1/completions", body).status_code < 500, body[:80]

    assert proc.poll() is None, "the server exited"
    assert requests.get(url + "/health", timeout=TIMEOUT_S).status_code == 200
    c = _client(url)
    greedy = hf_greedy_ids(tiny_pair)
    assert _ids(_complete(c, model, {"method": "none"})) == greedy["aligned"]
    assert _ids(_complete(c, model, {"method": "dera", "lambda": 0.0})) == greedy["reference"]


LONG_PROMPT = "the cat sat on the mat and the dog ran to the old tree " * 12  # > 64 tokens

SEEDED = [{"method": "none"}, {"method": "dera", "lambda": 0.5}, {"method": "aad", "alpha": 0.1},
          {"method": "mara", "decisions": "sampled", "top_k": 8}]


@pytest.mark.parametrize("alignment", SEEDED, ids=lambda a: a["method"])
def test_seeded_request_with_chunked_prefill_reproduces(align_server, tiny_pair, alignment):
    """A seeded sampled request whose prompt is prefilled in chunks: same text twice, once
    alone and once among other traffic, and the engine lives (it died on CPU before)."""
    from transformers import AutoTokenizer

    url, model, proc = align_server
    assert len(AutoTokenizer.from_pretrained(tiny_pair[0])(LONG_PROMPT).input_ids) > 64
    c = _client(url)

    def seeded(seed: int = 1234):
        return c.completions.create(model=model, prompt=LONG_PROMPT, max_tokens=16,
                                    temperature=1.0, seed=seed,
                                    extra_body={"alignment": alignment, "ignore_eos": True})

    alone = seeded().choices[0].text
    with ThreadPoolExecutor(4) as pool:
        noise = [pool.submit(c.completions.create, model=model, prompt=LONG_PROMPT[:40 * k],
                             max_tokens=12, temperature=1.0,
                             extra_body={"alignment": {"method": "mara"}, "ignore_eos": True})
                 for k in (1, 3)]
        busy = pool.submit(seeded)
        other_seed = pool.submit(seeded, 99)
        assert busy.result().choices[0].text == alone
        assert other_seed.result().choices[0].text != alone  # the seed decides
        for f in noise:
            assert f.result().choices[0].text
    assert proc.poll() is None


# -- prompt logprobs (echo) under the rule -----------------------------------

ECHO_RULES = [None,  # the engine default: DeRa lambda = 0
              {"method": "dera", "lambda": 0.5}, {"method": "dera", "lambda": 2.0},
              {"method": "aad", "alpha": 0.1}, {"method": "none"}]


def _by_id(entries: dict) -> dict[int, float]:
    """``{"token_id:N": logprob}`` (``return_tokens_as_token_ids``) -> ``{N: logprob}``."""
    return {int(k.split(":")[1]): v for k, v in entries.items()}


def test_echo_logprobs_follow_the_rule(align_server, tiny_pair):
    """lm-eval's loglikelihood request (`echo`, `logprobs`, `max_tokens` 1) under each rule,
    concurrently, a long prompt prefilled in chunks among them: every prompt logprob, top
    ones included, and the sampled token's equal the rule's by plain HF forwards; a
    request without `alignment` gets the engine default's. Chat's `prompt_logprobs` too;
    MARA refuses them (400, saying why)."""
    import hf_reference

    url, model, _ = align_server
    c = _client(url)
    hf_pair = hf_reference.load_pair(*tiny_pair)
    prompts = [LONG_PROMPT, PROMPT, LONG_PROMPT[:150], PROMPT + " the mat", PROMPT]

    def echo(prompt, alignment):
        extra = {"return_token_ids": True, "return_tokens_as_token_ids": True}
        if alignment is not None:
            extra["alignment"] = alignment
        return c.completions.create(model=model, prompt=prompt, max_tokens=1, temperature=0,
                                    echo=True, logprobs=3, extra_body=extra).choices[0]

    with ThreadPoolExecutor(len(ECHO_RULES)) as pool:
        choices = list(pool.map(echo, prompts, ECHO_RULES))
    scored = []
    for alignment, choice in zip(ECHO_RULES, choices):
        spec = alignment or {"method": "dera", "lambda": 0.0}
        ids = list(choice.prompt_token_ids) + list(choice.token_ids)
        lp = choice.logprobs
        assert [int(t.split(":")[1]) for t in lp.tokens] == ids
        returned = [None] + [{ids[i]: lp.token_logprobs[i], **_by_id(lp.top_logprobs[i])}
                             for i in range(1, len(ids))]
        expected = hf_reference.prompt_log_probs(*hf_pair, ids, spec)
        assert hf_reference.check_prompt_logprobs(expected, returned) >= 3 * (len(ids) - 1)
        scored.append((ids, returned))
    # The default (lambda = 0) is the reference model alone, none the aligned one alone.
    for (ids, returned), model_alone in ((scored[0], hf_pair[1]), (scored[-1], hf_pair[0])):
        hf_reference.check_prompt_logprobs(hf_reference.prompt_log_probs(
            model_alone, None, ids, {"method": "none"}), returned)

    for alignment in ({"method": "aad", "alpha": 0.2}, {"method": "dera", "lambda": 2.0}):
        chat = c.chat.completions.create(
            model=model, messages=[{"role": "user", "content": PROMPT}], max_tokens=1,
            temperature=0, extra_body={"alignment": alignment, "prompt_logprobs": 2,
                                       "return_token_ids": True})
        ids = list(chat.prompt_token_ids)
        returned = [None if p is None else {int(t): v["logprob"] for t, v in p.items()}
                    for p in chat.prompt_logprobs]
        assert hf_reference.check_prompt_logprobs(
            hf_reference.prompt_log_probs(*hf_pair, ids, alignment), returned) >= len(ids) - 1

    with pytest.raises(openai.BadRequestError) as err:
        echo(PROMPT, {"method": "mara"})
    assert "its rule is a walk" in str(err.value)
    with pytest.raises(openai.BadRequestError) as err:
        c.chat.completions.create(model=model, messages=[{"role": "user", "content": PROMPT}],
                                  max_tokens=1, extra_body={"alignment": {"method": "mara"},
                                                            "prompt_logprobs": 1})
    assert "prompt_logprobs: its rule is a walk" in str(err.value)
