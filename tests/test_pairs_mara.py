"""generate-pairs with MARA sides, through ``main(argv)``: every parameter reaches the engine
and the records, and an output recorded without them is not extended.

Two engines (the tiny aligned model with two agents, no reference): one run whose sides
must both be greedy decoding (an always-accepting agent named on the side; top_k 1 with
the default agent), one whose chosen side is the default agent's walk and whose rejected
side is greedy decoding (`none`, temperature 0)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vllm_align.cli.main import main
from vllm_align.data.pairs import CHOSEN_SAMPLING, PairsError, SideSpec, parse_side

N_PROMPTS, MAX_TOKENS = 12, 10
ALWAYS = {"method": "mara", "agent": "always"}
TOP_1 = {"method": "mara", "top_k": 1}
MARA_DEFAULTS = {"agent": "default", "top_k": 40, "top_p": 0.95, "threshold": 0.5,
                 "fallback": "last", "decisions": "greedy"}


@pytest.fixture(scope="module")
def setup(tiny_pair, tmp_path_factory):
    """(prompts path, {name: agent path}, argv builder)."""
    from transformers import AutoConfig

    from vllm_align.mara.agent import save_agent
    from vllm_align.toy.models import random_agent

    d = tmp_path_factory.mktemp("pairs-mara")
    hidden = AutoConfig.from_pretrained(tiny_pair[0]).hidden_size
    agents = {"default": random_agent(hidden, seed=1),       # state-dependent decisions
              "always": random_agent(hidden, seed=3, accept_bias=100.0)}
    paths = {name: str(save_agent(a, d / f"{name}.safetensors")) for name, a in agents.items()}
    prompts = d / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"the small house number {i} was"}) + "\n"
                               for i in range(N_PROMPTS)))

    def argv(out: Path, chosen: dict, rejected: dict) -> list[str]:
        return ["generate-pairs", "--model", tiny_pair[0], "--prompts", str(prompts),
                "--output", str(out), "--max-tokens", str(MAX_TOKENS), "--seed", "5",
                "--chosen", json.dumps(chosen), "--rejected", json.dumps(rejected),
                "--mara-agent", paths["default"], "--mara-agent", f"always={paths['always']}",
                "--dtype", "float32", "--max-model-len", "128", "--enforce-eager",
                "--no-progress"]

    return prompts, paths, argv


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def greedy_sides(setup, tmp_path_factory):
    """Both sides greedy by construction: the always-accepting agent, and top_k 1."""
    _, _, argv = setup
    out = tmp_path_factory.mktemp("greedy") / "pairs.jsonl"
    assert main(argv(out, ALWAYS, TOP_1)) == 0
    return out


@pytest.fixture(scope="module")
def walk_vs_greedy(setup, tmp_path_factory):
    _, _, argv = setup
    out = tmp_path_factory.mktemp("walk") / "pairs.jsonl"
    assert main(argv(out, {"method": "mara"}, {"method": "none", "temperature": 0})) == 0
    return _records(out)


@pytest.fixture(scope="module")
def hf_greedy(tiny_pair):
    """Greedy decoding of every prompt by a plain HF decoder of the aligned model, as text."""
    from transformers import AutoTokenizer

    import hf_reference

    tok = AutoTokenizer.from_pretrained(tiny_pair[0])
    model = hf_reference.load_pair(*tiny_pair)[0]
    texts = []
    for i in range(N_PROMPTS):
        ids = hf_reference.generate(model, None, tok(f"the small house number {i} was").input_ids,
                                    {"method": "none"}, MAX_TOKENS)
        # vLLM's incremental detokenizer holds back a trailing incomplete UTF-8 sequence.
        texts.append(tok.decode(ids, skip_special_tokens=True).rstrip("\ufffd"))
    return texts


def test_named_agent_and_top_k_1_decode_greedily(greedy_sides, walk_vs_greedy, hf_greedy):
    greedy = [r["rejected"] for r in walk_vs_greedy]
    assert greedy == hf_greedy
    recs = _records(greedy_sides)
    assert len(recs) == N_PROMPTS
    assert [r["chosen"] for r in recs] == greedy       # agent "always": every first candidate
    assert [r["rejected"] for r in recs] == greedy     # top_k 1: the only candidate
    # The default agent walks elsewhere: its side is not greedy decoding.
    assert any(r["chosen"] != g for r, g in zip(walk_vs_greedy, greedy))


def test_records_hold_the_specs_the_engine_used(greedy_sides, walk_vs_greedy, setup):
    _, paths, _ = setup
    for r in _records(greedy_sides):
        assert r["chosen_spec"] == {"method": "mara", **MARA_DEFAULTS, "agent": "always"}
        assert r["rejected_spec"] == {"method": "mara", **MARA_DEFAULTS, "top_k": 1}
        assert r["mara_agents"] == paths
    for r in walk_vs_greedy:
        assert r["chosen_spec"] == {"method": "mara", **MARA_DEFAULTS}
        assert r["rejected_spec"] == {"method": "none", "temperature": 0.0, "top_p": 0.9}


def test_rerun_resumes_and_old_mara_records_are_refused(greedy_sides, setup, tmp_path,
                                                        capsys):
    _, paths, argv = setup
    assert main(argv(greedy_sides, ALWAYS, TOP_1)) == 0    # the recorded specs match: done
    assert "already have pairs" in capsys.readouterr().err
    # Written by the old code: a MARA side recorded without its parameters.
    old = tmp_path / "old.jsonl"
    recs = _records(greedy_sides)[:4]
    for r in recs:
        r["chosen_spec"] = {"method": "mara", "temperature": 0.0, "top_p": 1.0}
        r["rejected_spec"] = {"method": "mara", "temperature": 0.0, "top_p": 1.0}
        del r["mara_agents"]
    old.write_text("".join(json.dumps(r) + "\n" for r in recs))
    before = old.read_bytes()
    assert main(argv(old, ALWAYS, TOP_1)) == 2
    err = capsys.readouterr().err
    assert "chosen_spec" in err and "use another --output or the same settings" in err
    assert old.read_bytes() == before
    # Agents other than the recorded ones are other settings too.
    swapped = tmp_path / "swapped.jsonl"
    swapped.write_bytes(greedy_sides.read_bytes())
    args = argv(swapped, ALWAYS, TOP_1)
    i = args.index(f"always={paths['always']}")
    args[i] = f"always={paths['default']}"
    assert main(args) == 2
    assert "mara_agents" in capsys.readouterr().err


@pytest.mark.parametrize("spec", [
    {"method": "none", "temperature": 0.7, "top_p": 0.8},
    {"method": "dera", "lambda": 2.5, "temperature": 1.0, "top_p": 0.9},
    {"method": "aad", "alpha": 0.3, "entropy_threshold": 0.5},
    {"method": "mara"},
    {"method": "mara", "agent": "always", "top_k": 3, "top_p": 0.5, "threshold": 0.25,
     "fallback": "first", "decisions": "sampled"},
])
def test_side_spec_round_trips(spec):
    side = parse_side(json.dumps(spec), side="chosen", defaults=CHOSEN_SAMPLING)
    recorded = side.to_json()
    assert recorded.items() >= spec.items()
    assert parse_side(recorded, side="chosen", defaults=CHOSEN_SAMPLING) == side
    assert side.sampling_params(8, seed=1).extra_args["align"] == side.align.to_json()
    if spec["method"] == "mara":      # top_p is MARA's nucleus, not vLLM's sampling
        assert side == SideSpec(side.align) and side.align.mara.top_p == spec.get("top_p", 0.95)


def test_mara_side_refuses_temperature_and_unknown_agents(setup, tmp_path, capsys):
    with pytest.raises(PairsError, match="'temperature' has no effect on a MARA side"):
        parse_side('{"method": "mara", "temperature": 1}', side="rejected",
                   defaults=CHOSEN_SAMPLING)
    _, _, argv = setup
    out = tmp_path / "x.jsonl"
    assert main(argv(out, {"method": "mara", "agent": "nope"}, TOP_1)) == 2
    assert "unknown MARA agent 'nope'" in capsys.readouterr().err
    assert not out.exists()
