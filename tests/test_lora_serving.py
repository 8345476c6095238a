"""A LoRA pair served: `vllm serve BASE --enable-lora --lora-modules ... --reference-model BASE`.

One server (tiny base, two peft adapters named at start, a third loaded at run time, room
for two at once, a 64-token step budget). Through the `openai` client a request's `model`
names its adapter, its aligned model; the base without an adapter is the reference. Tokens
and prompt logprobs are checked against HF + PEFT (``test_lora_pairs.merged``,
``hf_reference``).
"""

import json
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import requests

import hf_reference
from serving import MAX_TOKENS, PROMPT, client as _client, complete, ids, start, stop
from test_lora_pairs import make_adapter, merged

# --align-default: what an adapter request without `alignment` decodes.
DEFAULT = {"method": "dera", "lambda": 2.0}
LONG_PROMPT = "the cat sat on the mat and the dog ran to the old tree " * 12  # > 64 tokens


@pytest.fixture(scope="module")
def base(tiny_pair) -> str:
    return tiny_pair[1]


@pytest.fixture(scope="module")
def adapters(base, tmp_path_factory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("served-adapters")
    return {f"dpo{i}": make_adapter(base, d / f"dpo{i}", seed=30 + i) for i in range(3)}


@pytest.fixture(scope="module")
def server(base, adapters, tmp_path_factory):
    """(url, process); dpo2 is not named at start (the dynamic-loading test loads it)."""
    proc, url = start([base, "--enable-lora", "--lora-modules",
                       f"dpo0={adapters['dpo0']}", f"dpo1={adapters['dpo1']}",
                       "--max-lora-rank", "8", "--max-loras", "2", "--sampler", "align",
                       "--reference-model", base, "--align-default", json.dumps(DEFAULT),
                       "--max-num-batched-tokens", "64", "--enforce-eager"],
                      tmp_path_factory.mktemp("lora-serve") / "serve.log",
                      env={"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"})
    yield url, proc
    stop(proc)


@pytest.fixture(scope="module")
def hf_models(base, adapters):
    """{adapter name or None: HF model (base + adapter merged, or the base)}."""
    return {None: merged(base, None), **{n: merged(base, a) for n, a in adapters.items()}}


def _expected(hf_models, name, spec, prompt_ids) -> list[int]:
    return hf_reference.generate(hf_models[name], hf_models[None], list(prompt_ids), spec,
                                 MAX_TOKENS, ignore_eos=True)


def test_models_lists_the_adapters_as_stock_vllm(server, base, adapters):
    url, _ = server
    listed = {m.id: m for m in _client(url).models.list().data}
    assert {base, "dpo0", "dpo1"} <= set(listed) and "dpo2" not in listed
    for name in ("dpo0", "dpo1"):
        assert listed[name].root == adapters[name]
        assert listed[name].parent == base


RULES = [("dpo0", {"method": "dera", "lambda": 0.5}), ("dpo1", {"method": "dera", "lambda": 2.0}),
         ("dpo0", {"method": "aad", "alpha": 0.1}), ("dpo1", {"method": "none"}),
         ("dpo1", {"method": "aad", "alpha": 0.1, "entropy_threshold": 2.0})]


def test_adapter_requests_decode_their_rule(server, hf_models):
    """Concurrent completions (one engine batch mixing adapters and rules), each the
    tokens of its HF + PEFT decoder; the adapters matter."""
    url, _ = server
    c = _client(url)
    with ThreadPoolExecutor(len(RULES)) as pool:
        outs = list(pool.map(lambda r: complete(c, r[0], r[1]), RULES))
    for (name, spec), out in zip(RULES, outs):
        assert ids(out) == _expected(hf_models, name, spec, out.choices[0].prompt_token_ids), (
            name, spec)
    assert ids(outs[0]) != _expected(hf_models, None, {"method": "none"},
                                     outs[0].choices[0].prompt_token_ids)


def test_chat_and_streaming_on_adapters(server, hf_models):
    url, _ = server
    c = _client(url)
    messages = [{"role": "user", "content": PROMPT}]

    def chat(name, alignment, **kw):
        return c.chat.completions.create(
            model=name, messages=messages, max_tokens=MAX_TOKENS, temperature=0,
            extra_body={"alignment": alignment, "ignore_eos": True, "return_token_ids": True},
            **kw)

    for name, spec in RULES[:3]:
        whole = chat(name, spec)
        assert list(whole.choices[0].token_ids) == _expected(
            hf_models, name, spec, whole.prompt_token_ids), (name, spec)
        streamed = "".join(ch.choices[0].delta.content or "" for ch in chat(name, spec, stream=True)
                           if ch.choices)
        assert streamed == whole.choices[0].message.content
        parts = c.completions.create(model=name, prompt=PROMPT, max_tokens=MAX_TOKENS,
                                     temperature=0, stream=True,
                                     extra_body={"alignment": spec, "ignore_eos": True})
        assert "".join(p.choices[0].text for p in parts) == complete(c, name, spec).choices[0].text


def test_align_default_applies_to_adapter_requests(server, hf_models):
    url, _ = server
    out = complete(_client(url), "dpo1")
    assert ids(out) == _expected(hf_models, "dpo1", DEFAULT, out.choices[0].prompt_token_ids)
    assert ids(out) != _expected(hf_models, "dpo1", {"method": "none"},
                                 out.choices[0].prompt_token_ids)


def test_dera_and_aad_on_the_base_name_are_400_and_the_server_keeps_serving(
        server, base, hf_models):
    url, proc = server
    c = _client(url)
    # The default is DeRa: a base request without `alignment` is refused too.
    for alignment in ({"method": "dera", "lambda": 0.5}, {"method": "aad", "alpha": 0.1}, None):
        with pytest.raises(openai.BadRequestError) as err:
            complete(c, base, alignment)
        assert err.value.status_code == 400
        assert "needs an adapter" in str(err.value) and "adapter's name" in str(err.value)
    plain = complete(c, base, {"method": "none"})  # the base alone needs no adapter
    assert ids(plain) == _expected(hf_models, None, {"method": "none"},
                                   plain.choices[0].prompt_token_ids)
    out = complete(c, "dpo0", RULES[0][1])
    assert ids(out) == _expected(hf_models, "dpo0", RULES[0][1], out.choices[0].prompt_token_ids)
    assert proc.poll() is None


def test_an_adapter_loaded_at_run_time_decodes_its_rule(server, adapters, hf_models):
    """Stock vLLM's /v1/load_lora_adapter; with three adapters and room for two, vLLM
    swaps them in and out between requests."""
    url, _ = server
    c = _client(url)
    resp = requests.post(url + "/v1/load_lora_adapter", timeout=120,
                         json={"lora_name": "dpo2", "lora_path": adapters["dpo2"]})
    assert resp.status_code == 200, resp.text
    assert "dpo2" in {m.id for m in c.models.list().data}
    rows = [("dpo2", {"method": "dera", "lambda": 0.5}), ("dpo0", {"method": "aad", "alpha": 0.1}),
            ("dpo2", {"method": "aad", "alpha": 0.1}), ("dpo1", {"method": "dera", "lambda": 2.0})]
    with ThreadPoolExecutor(len(rows)) as pool:
        outs = list(pool.map(lambda r: complete(c, r[0], r[1]), rows))
    for (name, spec), out in zip(rows, outs):
        assert ids(out) == _expected(hf_models, name, spec, out.choices[0].prompt_token_ids), (
            name, spec)
    resp = requests.post(url + "/v1/unload_lora_adapter", timeout=60, json={"lora_name": "dpo2"})
    assert resp.status_code == 200, resp.text
    with pytest.raises(openai.NotFoundError):
        complete(c, "dpo2", {"method": "none"})


def _by_id(entries: dict) -> dict[int, float]:
    """``{"token_id:N": logprob}`` (``return_tokens_as_token_ids``) -> ``{N: logprob}``."""
    return {int(k.split(":")[1]): v for k, v in entries.items()}


ECHO_RULES = [("dpo0", {"method": "dera", "lambda": 0.5}, LONG_PROMPT),
              ("dpo1", {"method": "aad", "alpha": 0.1}, PROMPT + " the mat"),
              ("dpo1", None, LONG_PROMPT[:150]),  # the default
              ("dpo0", {"method": "none"}, PROMPT)]


def test_echo_logprobs_follow_the_rule_on_adapter_rows(server, hf_models):
    """`echo` + `logprobs` (lm-eval's loglikelihood request), concurrently, a long prompt
    prefilled in chunks among them; and chat's `prompt_logprobs`: each prompt logprob, top
    ones included, is the rule's over base + adapter and the base, by HF + PEFT."""
    url, _ = server
    c = _client(url)

    def echo(row):
        name, alignment, prompt = row
        extra = {"return_token_ids": True, "return_tokens_as_token_ids": True}
        if alignment is not None:
            extra["alignment"] = alignment
        return c.completions.create(model=name, prompt=prompt, max_tokens=1, temperature=0,
                                    echo=True, logprobs=3, extra_body=extra).choices[0]

    with ThreadPoolExecutor(len(ECHO_RULES)) as pool:
        choices = list(pool.map(echo, ECHO_RULES))
    for (name, alignment, _), choice in zip(ECHO_RULES, choices):
        spec = alignment or DEFAULT
        token_ids = list(choice.prompt_token_ids) + list(choice.token_ids)
        lp = choice.logprobs
        assert [int(t.split(":")[1]) for t in lp.tokens] == token_ids
        returned = [None] + [{token_ids[i]: lp.token_logprobs[i], **_by_id(lp.top_logprobs[i])}
                             for i in range(1, len(token_ids))]
        expected = hf_reference.prompt_log_probs(hf_models[name], hf_models[None], token_ids,
                                                 spec)
        assert hf_reference.check_prompt_logprobs(expected, returned) >= 3 * (
            len(token_ids) - 1), (name, spec)

    spec = {"method": "aad", "alpha": 0.2}
    chat = c.chat.completions.create(
        model="dpo1", messages=[{"role": "user", "content": PROMPT}], max_tokens=1,
        temperature=0, extra_body={"alignment": spec, "prompt_logprobs": 2,
                                   "return_token_ids": True})
    prompt_ids = list(chat.prompt_token_ids)
    returned = [None if p is None else {int(t): v["logprob"] for t, v in p.items()}
                for p in chat.prompt_logprobs]
    expected = hf_reference.prompt_log_probs(hf_models["dpo1"], hf_models[None], prompt_ids, spec)
    assert hf_reference.check_prompt_logprobs(expected, returned) >= len(prompt_ids) - 1
