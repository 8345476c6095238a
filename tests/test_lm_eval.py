"""lm-evaluation-harness drives `vllm serve --sampler align` and evaluates the configured rule.

The server runs the tiny pair with `--align-default` DeRa lambda = 2, so an unmodified client
gets DeRa. lm-eval (its own venv, `.venv-lmeval`, built by `make venv`; see the Makefile) runs
its `local-completions` model on two local tasks written here: a multiple-choice task (scored
from prompt logprobs: `echo`, `logprobs` 1, `max_tokens` 1) and a `generate_until` task. Its
per-choice loglikelihoods must be the DeRa rule's by plain HF forwards of both models, its
accuracy their argmax's, and its generations the greedy DeRa decoder's.
"""

import json
import os
import subprocess
from pathlib import Path

import pytest

import hf_reference
from serving import start, stop

ROOT = Path(__file__).resolve().parents[1]
LM_EVAL = ROOT / ".venv-lmeval" / "bin" / "lm_eval"
RULE = {"method": "dera", "lambda": 2.0}
MAX_GEN = 6

CHOICE_DOCS = [
    {"question": "the cat sat on", "choices": ["the mat", "the old tree", "a dog"], "label": 0},
    {"question": "the dog ran to", "choices": ["the cat", "the old tree", "the mat and"], "label": 1},
    {"question": "and the old", "choices": ["tree", "cat sat", "dog ran to the"], "label": 2},
]
GEN_DOCS = [{"prompt": "the cat sat on the", "target": "mat"},
            {"prompt": "the old dog ran", "target": "to"}]

TASKS = {
    "align_choice": """task: align_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
""",
    "align_gen": """task: align_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{target}}}}"
generation_kwargs:
  until: ["\\n\\n\\n"]
  max_gen_toks: {max_gen}
  temperature: 0
  ignore_eos: true
metric_list:
  - metric: exact_match
""",
}


def _lm_eval_ready() -> str | None:
    """Why lm-eval cannot run (None: it can)."""
    if not LM_EVAL.exists():
        return (f"lm-evaluation-harness is not installed at {LM_EVAL.parent.parent}: `make "
                "venv` builds it there, and its install failed (no route to PyPI?) or was not "
                "run; `rm -rf .venv-lmeval && make venv` retries")
    return None


@pytest.fixture(scope="module")
def dera_server(tiny_pair, tmp_path_factory):
    reason = _lm_eval_ready()
    if reason:  # before starting a server for nothing
        pytest.skip(reason)
    aligned, reference = tiny_pair
    tmp = tmp_path_factory.mktemp("lm-eval-server")
    proc, url = start([aligned, "--sampler", "align", "--reference-model", reference,
                       "--align-default", json.dumps(RULE), "--enforce-eager"],
                      tmp / "serve.log")
    yield url, aligned
    stop(proc)


def _write_tasks(root: Path) -> None:
    for name, docs in (("align_choice", CHOICE_DOCS), ("align_gen", GEN_DOCS)):
        data = root / f"{name}.jsonl"
        data.write_text("".join(json.dumps(d) + "\n" for d in docs))
        (root / f"{name}.yaml").write_text(TASKS[name].format(data=data, max_gen=MAX_GEN))


def _samples(out: Path, task: str) -> list[dict]:
    (path,) = out.rglob(f"samples_{task}_*.jsonl")
    return [json.loads(line) for line in path.read_text().splitlines()]


def _arguments(sample: dict) -> list[list]:
    """A logged sample's request arguments, in request order (``gen_args_i: {arg_j: ...}``)."""
    args = sample["arguments"]
    if isinstance(args, dict):
        args = [[a[f"arg_{j}"] for j in range(len(a))]
                for a in (args[f"gen_args_{i}"] for i in range(len(args)))]
    return args


def _encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's split of a (context, continuation) pair (``TemplateAPI``, causal, no BOS)."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer(context + continuation, add_special_tokens=False).input_ids
    n = len(tokenizer(context, add_special_tokens=False).input_ids)
    return whole[:n], whole[n:]


def test_lm_eval_scores_and_generates_under_the_engine_default(dera_server, tiny_pair, tmp_path):
    from transformers import AutoTokenizer

    url, model = dera_server
    _write_tasks(tmp_path)
    out = tmp_path / "out"
    args = ",".join([f"model={model}", f"base_url={url}/v1/completions",
                     "tokenizer_backend=huggingface", f"tokenizer={model}",
                     "tokenized_requests=True", "num_concurrent=4", "max_retries=1",
                     "max_length=256"])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "OPENAI_API_KEY": "unused"}
    done = subprocess.run(
        [str(LM_EVAL), "run", "--model", "local-completions", "--model_args", args,
         "--tasks", "align_choice,align_gen", "--include_path", str(tmp_path),
         "--output_path", str(out), "--log_samples", "--batch_size", "1"],
        capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]

    tokenizer = AutoTokenizer.from_pretrained(model)
    hf_pair = hf_reference.load_pair(*tiny_pair)
    correct = []
    for sample in _samples(out, "align_choice"):
        lls = []
        for (context, continuation), (ll, _greedy) in zip(_arguments(sample),
                                                         sample["filtered_resps"]):
            ctx, cont = _encode_pair(tokenizer, context, continuation)
            whole = ctx + cont
            dist = hf_reference.prompt_log_probs(*hf_pair, whole, RULE)
            want = sum(float(dist[i - 1, whole[i]]) for i in range(len(ctx), len(whole)))
            aligned_only = hf_reference.prompt_log_probs(hf_pair[0], None, whole,
                                                         {"method": "none"})
            assert abs(float(ll) - want) < 1e-4 * len(cont), (context, continuation, ll, want)
            assert abs(want - sum(float(aligned_only[i - 1, whole[i]])
                                  for i in range(len(ctx), len(whole)))) > 1e-2
            lls.append(want)
        correct.append(float(max(range(len(lls)), key=lls.__getitem__) == int(sample["target"])))
    results = json.loads(next(out.rglob("results_*.json")).read_text())["results"]
    assert abs(results["align_choice"]["acc,none"] - sum(correct) / len(correct)) < 1e-9

    for sample in _samples(out, "align_gen"):
        context = _arguments(sample)[0][0]
        prompt = tokenizer(context, add_special_tokens=False).input_ids
        ids = hf_reference.generate(*hf_pair, prompt, RULE, MAX_GEN, ignore_eos=True)
        want = tokenizer.decode(ids, skip_special_tokens=True).split("\n\n\n")[0]
        assert sample["filtered_resps"][0] == want, (context, sample["resps"])
