"""The vllm-align demo: the toy world decoded offline and through ``vllm serve``.

1. Takes the toy world shipped in the repository (``vllm_align.toy.shipped``,
   made by ``vllm_align.toy.world``): a tiny SFT model, a DPO model trained
   from it to be polite, and the polite reward; and the MARA agent trained on
   the SFT model with the SAC trainer (``vllm_align.toy.agent.toy_agent``).
   Nothing is built or trained: decoding starts at once.
2. Offline: one ``vllm.LLM`` on the DPO model with the SFT model as reference
   and the trained agent decodes every held-out prompt with every method in
   ONE mixed batch; prints a few prompts side by side and the mean reward per
   method. (The agent was trained on the SFT model's hidden states; here it
   reads the DPO model's, a light fine-tune of the same network.)
   On the same engine, a sweep (``vllm_align.data.sweep``, what ``vllm-align
   sweep`` runs) over DeRa lambda and AAD alpha with the polite reward as a
   Python callable; prints the table and writes the CSV and the reward-vs-lambda
   PNG into the output directory (``sweep/``).
3. MARA against its base LLM: a second ``vllm.LLM`` serving the SFT model, the
   model the agent was trained on, with the trained agent and the same run's
   untrained one; the SFT model alone (greedy, sampled) and MARA with either
   agent on the held-out prompts at the trained 16-token horizon
   (``vllm_align.cli.demo_runs``); prints the mean polite words per response.
4. Served: starts ``vllm serve DPO --sampler align --reference-model SFT`` on
   loopback, sends the same few prompts with per-request
   ``extra_body={"alignment": ...}`` through the ``openai`` client (the
   methods of one prompt concurrently, so they share server batches), prints
   them, and stops the server (also on errors and Ctrl-C).

Run ``make demo``, ``python examples/demo.py`` or ``vllm-align demo``.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator, Sequence

# Display name -> alignment spec (extra_args["align"] offline, "alignment" served).
# DeRa lambda=0 is the reference (SFT) model alone, "none" the aligned (DPO) one.
METHODS: dict[str, dict] = {
    "reference (SFT)": {"method": "dera", "lambda": 0.0},
    "DeRa lambda=0.5": {"method": "dera", "lambda": 0.5},
    "aligned (DPO)": {"method": "none"},
    "DeRa lambda=1.5": {"method": "dera", "lambda": 1.5},
    "DeRa lambda=2": {"method": "dera", "lambda": 2.0},
    "AAD alpha=0.1": {"method": "aad", "alpha": 0.1},
    # The toy agent trained with SAC on the SFT model (greedy decisions, the default).
    "MARA (trained)": {"method": "mara", "agent": "trained"},
}
SHOWN_PROMPTS = 3
# The sweep (vllm-align sweep) run on the offline engine: the toy world's rule as a callable.
SWEEP_REWARD = "vllm_align.toy.world:polite_pair_reward"
SWEEP_LAMBDAS = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0)
SWEEP_ALPHAS = (0.1, 0.2)
MAX_TOKENS = 96
MAX_MODEL_LEN = 256
WIDTH = 100


def default_out_dir() -> Path:
    """``.cache/demo`` in the current directory (``toy.cache``)."""
    from vllm_align.toy.cache import cache_dir

    return cache_dir("demo")


def main(out_dir: str | os.PathLike | None = None, *, serve: bool = True) -> int:
    """Run the demo; returns a process exit code."""
    # Tiny models need little KV cache; keep vLLM's log lines out of the tables.
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    # vLLM's engine processes inherit this (they start with spawn).
    os.environ.setdefault("PYTHONWARNINGS", "ignore::FutureWarning")
    started = time.monotonic()
    out = Path(out_dir) if out_dir is not None else default_out_dir()
    out.mkdir(parents=True, exist_ok=True)

    from vllm_align.toy import shipped

    world = shipped.world()
    _heading(f"Toy world (shipped in {shipped.ASSETS_DIR})")
    print(f"  SFT model: {world.sft_path}\n  DPO model: {world.dpo_path}")
    print(f"  reward: fraction of polite words; {len(world.prompts)} held-out prompts")
    print(f"  built by `make toy-assets` in {world.stats['build_seconds']:.0f}s")
    agent = _agent()

    shown = world.prompts[:SHOWN_PROMPTS]
    try:
        offline = _offline(world, agent, out)
        _mara_vs_base(world, agent)
        if serve:
            served = _served(world, agent, shown, out)
            same = sum(served[p][name] == offline[p][name] for p in shown for name in METHODS)
            print(f"\nServed responses identical to the offline ones: {same}/"
                  f"{len(shown) * len(METHODS)}")
    except KeyboardInterrupt:
        print("\nInterrupted.", file=sys.stderr)
        return 130
    print(f"\nDemo finished in {time.monotonic() - started:.0f}s.")
    return 0


def _agent():
    """The shipped toy MARA agent, trained on the SFT model."""
    from vllm_align.toy import shipped
    from vllm_align.toy.agent import ToySettings

    settings = ToySettings()
    _heading("MARA agent: SAC on the SFT model (vllm-align train-mara)")
    print(f"  reward: number of polite words in a {settings.max_response_len}-token response; "
          f"{settings.episodes} training episodes", flush=True)
    agent = shipped.agent()
    print(f"  agent: {agent.trained}\n  (trained in {agent.stats['train_seconds']:.0f}s, "
          f"{agent.stats['updates']} SAC updates; learning curve: {agent.metrics_csv})")
    return agent


def _offline(world, agent, out_dir: Path) -> dict[str, dict[str, str]]:
    """Decode all held-out prompts with all methods in one batch, then a lambda/alpha sweep
    on the same engine (CSV + PNG in ``out_dir``); print; return the shown texts."""
    import gc

    from vllm import LLM

    from vllm_align.data.sweep import format_rows, generate_grid, score_and_write
    from vllm_align.cli.demo_runs import Run, decode_runs

    _heading("Offline: one LLM engine, every method in one batch")
    for name, spec in METHODS.items():
        print(f"  {name:<18} extra_args={{'align': {spec}}}")
    llm = LLM(model=world.dpo_path, dtype="float32", max_model_len=MAX_MODEL_LEN, seed=0,
              additional_config={"align": {"reference_model": world.sft_path,
                                           "mara_agents": {"trained": str(agent.trained)}}})
    try:
        prompt_ids = world.prompt_token_ids(llm.get_tokenizer())
        t0 = time.monotonic()
        runs = {name: Run(spec, sampled=False, label=name) for name, spec in METHODS.items()}
        outputs = {name: reps[0] for name, reps in
                   decode_runs(llm, prompt_ids, runs, max_tokens=MAX_TOKENS).items()}
        seconds = time.monotonic() - t0
        # The sweep reuses this engine: its start-up is most of the demo's time.
        sweep_cfg, sweep_items = _sweep_config(world, out_dir)
        sweep_gen = generate_grid(llm, sweep_cfg, sweep_items)
    finally:
        del llm
        gc.collect()
    texts = {name: [o.text for o in outs] for name, outs in outputs.items()}
    tokens = sum(len(o.token_ids) for outs in outputs.values() for o in outs)
    print(f"  {len(prompt_ids) * len(METHODS)} sequences, {tokens} tokens in {seconds:.1f}s")

    shown = {}
    for i, prompt in enumerate(world.prompts[:SHOWN_PROMPTS]):
        shown[prompt] = {name: texts[name][i] for name in METHODS}
        _prompt_table(i + 1, prompt, shown[prompt], world.reward)

    print(f"\nMean polite reward over the {len(world.prompts)} held-out prompts "
          f"(greedy, {MAX_TOKENS} tokens max):")
    print(f"  {'method':<18} {'reward':>7} {'stderr':>7}")
    for name in METHODS:
        rewards = [world.reward(t) for t in texts[name]]
        stderr = statistics.stdev(rewards) / len(rewards) ** 0.5
        print(f"  {name:<18} {statistics.mean(rewards):7.4f} {stderr:7.4f}")
    print("  (MARA here reads the DPO model's states; the agent was trained on SFT's: its\n"
          "  comparison with the model it was trained on follows the sweep)")

    _heading("Sweep: reward vs DeRa lambda and AAD alpha (vllm-align sweep)")
    print(f"  $ vllm-align sweep --model {world.dpo_path} --reference-model {world.sft_path} \\\n"
          f"      --prompts {sweep_cfg.prompts} --reward {SWEEP_REWARD} \\\n"
          f"      --lambdas {','.join(f'{v:g}' for v in SWEEP_LAMBDAS)} "
          f"--alphas {','.join(f'{v:g}' for v in SWEEP_ALPHAS)} "
          f"--max-tokens {MAX_TOKENS} --output {sweep_cfg.output}")
    print(f"  (run here on the engine above: {len(sweep_gen.responses)} sequences, "
          f"{sweep_gen.tokens} tokens in {sweep_gen.seconds:.1f}s)\n")
    rows = score_and_write(sweep_cfg, sweep_items, sweep_gen)
    print(textwrap.indent(format_rows(rows), "  "))
    print(f"\n  CSV:  {sweep_cfg.output}\n  plot: {sweep_cfg.plot}")
    return shown


def _mara_vs_base(world, agent) -> None:
    """The trained agent against its base LLM: an engine serving the SFT model."""
    import gc

    from vllm_align.cli import demo_runs as toy_mara
    from vllm_align.toy.world import polite_count

    n = len(toy_mara.SEEDS)
    _heading("MARA vs its base LLM: one LLM engine on the SFT model, the agents it was "
             "trained with")
    print(f"  LLM(model={world.sft_path!r}, additional_config={{'align': {{'mara_agents': "
          f"{{'trained': ..., 'untrained': ...}}}}}})")
    print(f"  extra_args={{'align': {toy_mara.RUNS['trained sampled'].align}}}")
    llm = toy_mara.build_engine(agent)
    try:
        t0 = time.monotonic()
        outputs = toy_mara.decode_runs(llm, world.prompt_token_ids(llm.get_tokenizer()))
        seconds = time.monotonic() - t0
    finally:
        del llm
        gc.collect()
    print(f"  {sum(len(r) for reps in outputs.values() for r in reps)} sequences in "
          f"{seconds:.1f}s\n")
    words = toy_mara.mean_rewards(outputs, lambda text: polite_count("", text))
    fraction = toy_mara.mean_rewards(outputs, world.reward)
    print(f"Polite words per {toy_mara.MAX_TOKENS}-token response, {len(world.prompts)} held-out "
          f"prompts (sampled runs: mean of {n}, min-max):")
    print(f"  {'decoding':<44} {'words':>6} {'min-max':>11} {'reward':>7}")
    for name, run in toy_mara.RUNS.items():
        w = words[name]
        spread = f"{min(w):.2f}-{max(w):.2f}" if len(w) > 1 else ""
        print(f"  {run.label:<44} {statistics.mean(w):6.2f} {spread:>11} "
              f"{statistics.mean(fraction[name]):7.4f}")
    print("  (reward: the fraction of polite words, as in the tables above. The untrained\n"
          "  agent's greedy score is not learned: it rejects nearly every candidate, and the\n"
          "  fallback emits the last, least probable one, often polite here)")
    i = 1
    print(f"\n[{i + 1}] user: {world.prompts[i]}")
    for name in ("plain greedy", "plain sampling", "trained sampled", "trained greedy"):
        text = outputs[name][0][i].text
        print(f"  {toy_mara.RUNS[name].label:<44} {text.strip() or '(empty)'}")
    sys.stdout.flush()


def _sweep_config(world, out_dir: Path):
    """The demo's sweep: the held-out prompts as chat records, the rule reward as a callable."""
    from vllm_align.data.prompts import read_prompts
    from vllm_align.data.sweep import SweepConfig
    from vllm_align.toy.corpus import chat_messages

    out = out_dir / "sweep"
    out.mkdir(exist_ok=True)
    prompts = out / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": i, "messages": chat_messages(p)}) + "\n"
                               for i, p in enumerate(world.prompts)))
    cfg = SweepConfig(model=world.dpo_path, reference_model=world.sft_path,
                      prompts=str(prompts), reward=SWEEP_REWARD, output=str(out / "sweep.csv"),
                      lambdas=SWEEP_LAMBDAS, alphas=SWEEP_ALPHAS, max_tokens=MAX_TOKENS,
                      progress=False)
    return cfg, read_prompts(prompts)


def _served(world, agent, prompts: Sequence[str], out_dir: Path) -> dict[str, dict[str, str]]:
    """Ask a live ``vllm serve`` the same prompts; print; return the texts."""
    import openai

    from vllm_align.toy.corpus import chat_messages

    _heading("Served: vllm serve --sampler align, per-request extra_body={'alignment': ...}")
    log = out_dir / "serve.log"
    with _server(world, agent, log) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)

        def ask(prompt: str, spec: dict) -> str:
            reply = client.chat.completions.create(
                model=world.dpo_path, messages=chat_messages(prompt),
                max_tokens=MAX_TOKENS, temperature=0, extra_body={"alignment": spec})
            return reply.choices[0].message.content

        results = {}
        with ThreadPoolExecutor(max_workers=len(METHODS)) as pool:
            for i, prompt in enumerate(prompts):
                futures = {name: pool.submit(ask, prompt, spec)
                           for name, spec in METHODS.items()}
                results[prompt] = {name: f.result() for name, f in futures.items()}
                _prompt_table(i + 1, prompt, results[prompt], world.reward)
    return results


@contextlib.contextmanager
def _server(world, agent, log: Path) -> Iterator[str]:
    """Start ``vllm serve`` on a free loopback port; always stop it on exit."""
    from vllm_align.cli import local_server

    port = local_server.free_port()
    args = [world.dpo_path, "--sampler", "align", "--reference-model", world.sft_path,
            "--mara-agent", f"trained={agent.trained}",
            "--dtype", "float32", "--max-model-len", str(MAX_MODEL_LEN), "--seed", "0"]
    print(f"  $ vllm serve {world.dpo_path} --sampler align \\\n"
          f"      --reference-model {world.sft_path} --mara-agent trained=... --port {port} ...")
    print(f"  (full command and server log in {log})", flush=True)
    t0 = time.monotonic()
    try:
        proc, url = local_server.start(args, log, port=port)
        print(f"  server up on {url} after {time.monotonic() - t0:.0f}s", flush=True)
        try:
            yield url
        finally:
            local_server.stop(proc)
    finally:
        print("  server stopped", flush=True)


def _heading(text: str) -> None:
    print(f"\n== {text} " + "=" * max(0, WIDTH - len(text) - 4), flush=True)


def _prompt_table(number: int, prompt: str, texts: dict[str, str], reward) -> None:
    print(f"\n[{number}] user: {prompt}")
    print(f"  {'method':<18} {'reward':>6}  response")
    indent = " " * 29
    for name, text in texts.items():
        lines = textwrap.wrap(text.strip() or "(empty)", WIDTH - len(indent)) or [""]
        print(f"  {name:<18} {reward(text):6.3f}  {lines[0]}")
        for line in lines[1:]:
            print(indent + line)
    sys.stdout.flush()
