"""`vllm-align sweep` through `main(argv)`, on the toy world (vllm_align.toy.world).

One engine run over the 64 held-out prompts (chat ``messages``) x DeRa lambda
{0, 0.5, 1, 2} + AAD alpha 0.1, rewarded by the toy world's polite-word rule
given as a ``module:function`` callable. The same decoding as
tests/test_toy_world.py's (greedy, 96 tokens): reward strictly rising with lambda, AAD
above greedy DPO (lambda 1), neighbouring values about 0.02 or more apart
(docs/toy-measurements.md).

The world is the one shipped in the repository (``vllm_align.toy.shipped``).
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from pathlib import Path

import pytest

from vllm_align.cli.main import main
from vllm_align.toy import shipped
from vllm_align.toy import world as toy
from vllm_align.toy.corpus import chat_messages

REWARD = "vllm_align.toy.world:polite_pair_reward"
GRID = [("dera", 0.0), ("dera", 0.5), ("dera", 1.0), ("dera", 2.0), ("aad", 0.1)]


@pytest.fixture(scope="module")
def world() -> toy.ToyWorld:
    return shipped.world()


@pytest.fixture(scope="module")
def prompts_file(world, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("sweep-in") / "prompts.jsonl"
    path.write_text("".join(json.dumps({"id": f"p{i}", "messages": chat_messages(p)}) + "\n"
                            for i, p in enumerate(world.prompts)))
    return path


@pytest.fixture(scope="module")
def sweep(world, prompts_file, tmp_path_factory):
    """Run the sweep once; count ``LLM.generate`` calls and their requests."""
    import vllm

    out = tmp_path_factory.mktemp("sweep-out")
    calls: list[int] = []
    generate = vllm.LLM.generate

    def counting_generate(self, prompts, *args, **kwargs):
        calls.append(len(prompts))
        return generate(self, prompts, *args, **kwargs)

    argv = ["sweep", "--model", world.dpo_path, "--reference-model", world.sft_path,
            "--prompts", str(prompts_file), "--reward", REWARD, "--output", str(out / "s.csv"),
            "--lambdas", "0,0.5,1,2", "--alphas", "0.1", "--responses-dir", str(out / "resp"),
            "--max-tokens", "96", "--max-model-len", "256", "--dtype", "float32",
            "--enforce-eager", "--no-progress"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(vllm.LLM, "generate", counting_generate)
        assert main(argv) == 0
    return out, calls


def _rows(out: Path) -> list[dict]:
    with open(out / "s.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_one_generate_call_holds_the_whole_grid(sweep, world):
    _, calls = sweep
    assert calls == [len(GRID) * len(world.prompts)]


def test_csv_rows_follow_the_grid_and_equal_the_reward_of_the_responses(sweep, world):
    out, _ = sweep
    rows = _rows(out)
    assert list(rows[0]) == ["method", "parameter", "n", "mean", "stderr"]
    assert [(r["method"], float(r["parameter"])) for r in rows] == GRID
    tokenizer_prompts = None
    for row, (method, value) in zip(rows, GRID):
        name = f"{method}_{'lambda' if method == 'dera' else 'alpha'}={value:g}.jsonl"
        recs = [json.loads(line) for line in (out / "resp" / name).read_text().splitlines()]
        assert [r["id"] for r in recs] == [f"p{i}" for i in range(len(world.prompts))]
        rewards = [toy.polite_reward(r["response"]) for r in recs]
        assert [r["reward"] for r in recs] == rewards
        assert int(row["n"]) == len(world.prompts)
        assert float(row["mean"]) == pytest.approx(statistics.mean(rewards), rel=1e-12)
        assert float(row["stderr"]) == pytest.approx(
            statistics.stdev(rewards) / math.sqrt(len(rewards)), rel=1e-9)
        prompts = [r["prompt"] for r in recs]
        assert tokenizer_prompts in (None, prompts)     # same rendered prompts everywhere
        tokenizer_prompts = prompts
    # The prompt passed to the reward is the chat-rendered one the model saw.
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(world.dpo_path)
    assert tokenizer_prompts[0] == tok.apply_chat_template(
        chat_messages(world.prompts[0]), tokenize=False, add_generation_prompt=True)


def test_reward_rises_with_lambda_and_aad_beats_dpo(sweep):
    out, _ = sweep
    means = {(r["method"], float(r["parameter"])): float(r["mean"]) for r in _rows(out)}
    dera = [means[("dera", lam)] for lam in (0.0, 0.5, 1.0, 2.0)]
    assert all(a < b for a, b in zip(dera, dera[1:])), dera
    assert means[("aad", 0.1)] > means[("dera", 1.0)], means


def test_plot_is_a_png(sweep):
    out, _ = sweep
    data = (out / "s.png").read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    from matplotlib.image import imread

    image = imread(out / "s.png")
    assert image.ndim == 3 and image.shape[1] > image.shape[0] > 100
    # Not a blank canvas: curves, labels and bands make many distinct colours.
    assert len({tuple(px) for px in image.reshape(-1, image.shape[2])[::7].tolist()}) > 20


# -- refused before any engine starts ---------------------------------------

@pytest.mark.parametrize("extra, message", [
    (["--lambdas", "0,x"], "--lambdas: 'x' is not a number"),
    (["--lambdas", "0,nan"], "--lambdas: 'nan' is not a finite number"),
    (["--lambdas", "1,1"], "--lambdas: 1 is given twice"),
    (["--alphas", "0.1,0"], "--alphas: alignment 'alpha' must be in (0, 1], got 0.0"),
    ([], "nothing to sweep"),
    (["--lambdas", "1", "--max-tokens", "0"], "--max-tokens must be >= 1, got 0"),
    (["--lambdas", "1", "--top-p", "1.5"], "--top-p must be in (0, 1], got 1.5"),
    (["--lambdas", "1", "--reward", "vllm_align.toy.world:nope"], "has no callable named 'nope'"),
    (["--lambdas", "1", "--plot", "OUT"], "--plot and --output are the same file"),
])
def test_bad_flags_are_refused(tmp_path, capsys, extra, message):
    out = tmp_path / "s.csv"
    argv = ["sweep", "--model", "m", "--reference-model", "r", "--prompts",
            str(tmp_path / "p.jsonl"), "--reward", REWARD, "--output", str(out)]
    extra = [str(out) if x == "OUT" else x for x in extra]
    if "--reward" in extra:
        argv = argv[:argv.index("--reward")] + argv[argv.index("--reward") + 2:]
    assert main(argv + extra) == 2
    err = capsys.readouterr().err
    assert err.startswith("vllm-align sweep: error: ") and message in err, err
    assert not out.exists()


def test_bad_prompt_file_is_refused_before_the_engine(tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "ok"}\n{"text": "no prompt"}\n')
    argv = ["sweep", "--model", "m", "--reference-model", "r", "--prompts", str(prompts),
            "--reward", REWARD, "--output", str(tmp_path / "s.csv"), "--lambdas", "0,1"]
    assert main(argv) == 2
    assert f"{prompts}:2: needs 'prompt'" in capsys.readouterr().err


# -- sampling with per-prompt seeds, long prompts ---------------------------

@pytest.fixture(scope="module")
def sampled(tiny_pair, tmp_path_factory):
    """(argv for an output dir, the one-engine run's output dir) of a sampled sweep.

    Temperature 1, prompt i seeded seed + i, a file.py:function reward. 24 prompts of
    ~250 tokens x 2 grid points exceed a step's 4096-token budget, so some seeded request
    is prefilled in pieces.
    """
    aligned, reference = tiny_pair
    tmp = tmp_path_factory.mktemp("sampled")
    prompts = tmp / "p.jsonl"
    # Distinct from the first token on: no prefix-cache hits shrink the prefills.
    prompts.write_text("".join(
        json.dumps({"prompt": f"number {i}: "
                    + " ".join(["the small house was near the old river"] * 28)}) + "\n"
        for i in range(24)))
    scorer = tmp / "score.py"
    scorer.write_text("def chars(prompt, response):\n    return float(len(response))\n")

    def argv(out: Path) -> list[str]:
        return ["sweep", "--model", aligned, "--reference-model", reference,
                "--prompts", str(prompts), "--reward", f"{scorer}:chars",
                "--output", str(out / "s.csv"), "--lambdas", "0,1", "--temperature", "1",
                "--seed", "5", "--max-tokens", "8", "--responses-dir", str(out / "resp"),
                "--dtype", "float32", "--max-model-len", "512", "--enforce-eager",
                "--no-progress"]

    out = tmp / "out"
    assert main(argv(out)) == 0
    return argv, out


def test_sampled_sweep_with_long_prompts(sampled):
    """Seeded chunked prefills killed vLLM 0.32's CPU engine ("CPU Generator does not use
    offset") until patches/model_runner.py rewound CPU generators by state; the data tools
    keep chunked prefill on."""
    _, out = sampled
    rows = _rows(out)
    assert [(r["method"], float(r["parameter"]), int(r["n"])) for r in rows] == \
        [("dera", 0.0, 24), ("dera", 1.0, 24)]
    texts = {}
    for row, name in zip(rows, ("dera_lambda=0.jsonl", "dera_lambda=1.jsonl")):
        recs = [json.loads(line) for line in (out / "resp" / name).read_text().splitlines()]
        texts[name] = [r["response"] for r in recs]
        assert float(row["mean"]) == pytest.approx(
            statistics.mean(len(t) for t in texts[name]), rel=1e-12)
    # Two different models sampled with the same seeds: different text.
    assert texts["dera_lambda=0.jsonl"] != texts["dera_lambda=1.jsonl"]
