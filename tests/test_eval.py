"""`vllm-align eval` through `main(argv)`: numbers against hand computation."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from tiny_reward import build_reward_model, direct_score
from vllm_align.cli.main import main

# reward = number of words, cost = number of "!" (see _scorers).
#        A response            B response     r_A r_B  c_A c_B  win rate  preference
ROWS = [("one two three",     "one two!"),   # 3   2    0   1    win       win
        ("one!",              "one two"),    # 1   2    1   0    loss      loss
        ("one two",           "uno dos"),    # 2   2    0   0    tie       tie
        ("one two three!!",   "one!"),       # 3   1    2   1    win       tie
        ("x",                 "x y z"),      # 1   3    0   0    loss      tie
        ("a b c d",           "a b c!!")]    # 4   3    0   2    win       win
PROMPTS = [f"question {i}: " for i in range(len(ROWS))]


@pytest.fixture
def scorers(tmp_path) -> tuple[str, str]:
    f = tmp_path / "scorers.py"
    f.write_text("def words(prompt, response):\n    return len(response.split())\n\n"
                 "def bangs(prompt, response):\n    return response.count('!')\n")
    return f"{f}:words", f"{f}:bangs"


def _write(path: Path, records: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


@pytest.fixture
def files(tmp_path) -> tuple[str, str]:
    a = [{"id": i, "prompt": p, "response": ra} for i, (p, (ra, _)) in enumerate(zip(PROMPTS, ROWS))]
    b = [{"id": i, "prompt": p, "response": rb, "extra": 1}
         for i, (p, (_, rb)) in enumerate(zip(PROMPTS, ROWS))]
    random.Random(0).shuffle(b)          # matched by id, not by line
    return _write(tmp_path / "a.jsonl", a), _write(tmp_path / "b.jsonl", b)


def test_win_and_preference_rates_match_hand_computation(files, scorers, tmp_path, capsys):
    (a, b), (reward, cost) = files, scorers
    out = tmp_path / "report.json"
    assert main(["eval", a, b, "--reward", reward, "--cost", cost, "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["n"] == 6 and report["matched_by"] == "id"
    assert report["win_rate"] == {"n": 6, "wins": 3, "ties": 1, "losses": 2, "rate": 0.5,
                                  "rate_ties_half": 3.5 / 6}
    assert report["preference_rate"]["wins"] == 2
    assert report["preference_rate"]["ties"] == 3
    assert report["preference_rate"]["losses"] == 1
    assert report["preference_rate"]["rate"] == pytest.approx(1 / 6)
    assert report["reward"]["a"]["mean"] == pytest.approx(14 / 6)
    assert report["reward"]["b"]["mean"] == pytest.approx(13 / 6)
    assert report["cost"]["a"]["mean"] == pytest.approx(3 / 6)
    assert report["cost"]["b"]["mean"] == pytest.approx(4 / 6)
    text = capsys.readouterr().out
    assert "win rate of A (AAD paper)" in text and "0.5000" in text
    assert "preference rate of A (MARA paper)" in text and "+0.1667" in text
    assert "wins 3, ties 1, losses 2" in text


def test_without_ids_records_are_matched_by_prompt(tmp_path, scorers, capsys):
    reward, _ = scorers
    a = _write(tmp_path / "a.jsonl", [{"prompt": p, "response": ra}
                                      for p, (ra, _) in zip(PROMPTS, ROWS)])
    b = _write(tmp_path / "b.jsonl", [{"prompt": p, "response": rb}
                                      for p, (_, rb) in reversed(list(zip(PROMPTS, ROWS)))])
    out = tmp_path / "r.json"
    assert main(["eval", a, b, "--reward", reward, "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["matched_by"] == "prompt"
    assert (report["win_rate"]["wins"], report["win_rate"]["losses"]) == (3, 2)
    assert report["preference_rate"] is None and report["cost"] is None
    assert "needs --cost" in capsys.readouterr().out


def test_generate_pairs_file_chosen_vs_rejected(tmp_path, scorers):
    reward, cost = scorers
    pairs = _write(tmp_path / "pairs.jsonl", [
        {"id": i, "prompt": p, "chosen": ra, "rejected": rb, "seed": i}
        for i, (p, (ra, rb)) in enumerate(zip(PROMPTS, ROWS))])
    out = tmp_path / "r.json"
    assert main(["eval", pairs, pairs, "--a-field", "chosen", "--b-field", "rejected",
                 "--reward", reward, "--cost", cost, "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["win_rate"]["rate"] == 0.5
    assert report["preference_rate"]["rate"] == pytest.approx(1 / 6)


def test_reward_model_path(files, scorers, tmp_path):
    """An HF sequence-classification model as reward: the rates follow its scores."""
    a, b = files
    _, cost = scorers
    rm = build_reward_model(tmp_path / "rm", seed=1, chat_template=False)   # prompt + response
    out = tmp_path / "r.json"
    assert main(["eval", a, b, "--reward", rm, "--cost", cost, "--json", str(out),
                 "--batch-size", "4"]) == 0
    report = json.loads(out.read_text())
    ra = [direct_score(rm, p + x) for p, (x, _) in zip(PROMPTS, ROWS)]
    rb = [direct_score(rm, p + y) for p, (_, y) in zip(PROMPTS, ROWS)]
    costs = [(x.count("!"), y.count("!")) for x, y in ROWS]
    wins = sum(x > y for x, y in zip(ra, rb))
    losses = sum(x < y for x, y in zip(ra, rb))
    assert 0 < wins < 6                       # the model's scores make a non-trivial case
    assert (report["win_rate"]["wins"], report["win_rate"]["losses"]) == (wins, losses)
    pw = sum(x > y and c[0] < c[1] for x, y, c in zip(ra, rb, costs))
    pl = sum(x < y and c[0] > c[1] for x, y, c in zip(ra, rb, costs))
    assert report["preference_rate"]["rate"] == pytest.approx((pw - pl) / 6)
    assert report["reward"]["a"]["mean"] == pytest.approx(sum(ra) / 6, abs=1e-4)


def test_bad_inputs_are_refused(files, scorers, tmp_path, capsys):
    (a, b), (reward, _) = files, scorers
    short = _write(tmp_path / "short.jsonl", [{"id": 0, "prompt": PROMPTS[0], "response": "x"}])
    assert main(["eval", a, short, "--reward", reward]) == 2
    assert "5 only in A" in capsys.readouterr().err
    dup = _write(tmp_path / "dup.jsonl", [{"id": 0, "prompt": "p", "response": "x"}] * 2)
    assert main(["eval", dup, b, "--reward", reward]) == 2
    assert "id 0 appears twice" in capsys.readouterr().err
    assert main(["eval", a, b, "--reward", reward, "--b-field", "answer"]) == 2
    assert "needs a string 'answer'" in capsys.readouterr().err
    assert main(["eval", a, a, "--reward", reward]) == 2
    assert "A and B are the same responses" in capsys.readouterr().err
    other = _write(tmp_path / "other.jsonl", [{"id": i, "prompt": "other " + p, "response": "x"}
                                              for i, p in enumerate(PROMPTS)])
    assert main(["eval", a, other, "--reward", reward]) == 2
    assert "id 0 has different prompts" in capsys.readouterr().err
    assert main(["eval", a, b, "--reward", "nope.py:f"]) == 2
    assert "no such Python file" in capsys.readouterr().err
