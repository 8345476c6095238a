"""Reward as a function of the alignment dial: ``vllm-align sweep``.

One engine (aligned model + reference), one ``LLM.generate`` call holding every
(grid point, prompt) request, so all grid points share the engine's batches
and prefix cache; then every response is scored by a reward
(``vllm_align.data.rewards``). Grid points: DeRa lambda values (sampled from
``softmax(lambda * h_aligned + (1 - lambda) * h_ref)``) and AAD alpha values.

Outputs:

* CSV ``method,parameter,n,mean,stderr``: one row per grid point in grid
  order (DeRa lambdas, then AAD alphas), ``stderr`` = s / sqrt(n);
* PNG: mean reward (error bars: standard error) against lambda, as in the DeRa
  paper's figure 2, each AAD alpha as a horizontal line with its band; with two
  or more alphas, a second panel of reward against alpha;
* optionally, ``--responses-dir``: one JSONL per grid point
  (``id``, ``prompt``, ``response``, ``reward``, ``method``, ``parameter``, and
  ``messages`` for chat prompts), which ``vllm-align eval`` reads directly.

Sampling: ``temperature`` 0 (default) is greedy, the DeRa/AAD papers' setting;
with temperature > 0 prompt ``i`` is sampled with seed ``seed + i`` at every
grid point (common random numbers: the grid points differ by the rule, not by
the draw).
"""

from __future__ import annotations

import csv
import gc
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from vllm_align.config import EXTRA_ARGS_KEY, AlignConfigError, AlignParams, EngineAlignConfig
from vllm_align.data.engine import LoraAdapter, check_lora_engine, lora_adapter_option
from vllm_align.data.metrics import mean_sem
from vllm_align.data.prompts import DataError, Prompt, PromptItem, read_prompts, render_prompt
from vllm_align.data.rewards import REWARD_HELP
from vllm_align.fields import option

CSV_FIELDS = ("method", "parameter", "n", "mean", "stderr")


@dataclass(frozen=True)
class GridPoint:
    """One decoding rule of the sweep: DeRa at ``lambda`` or AAD at ``alpha``."""

    method: str         # "dera" | "aad"
    parameter: float    # lambda for dera, alpha for aad

    @property
    def params(self) -> AlignParams:
        """The rule, parsed (and checked) as the engine parses it."""
        key = "lambda" if self.method == "dera" else "alpha"
        return AlignParams.parse({"method": self.method, key: self.parameter})

    @property
    def label(self) -> str:
        return f"{self.method}_{'lambda' if self.method == 'dera' else 'alpha'}={self.parameter:g}"


def parse_grid(text: str | Sequence[float], flag: str) -> tuple[float, ...]:
    """``"0,0.5,1"`` (or a list of numbers) -> ``(0.0, 0.5, 1.0)``; names the bad item."""
    items = text.split(",") if isinstance(text, str) else list(text)
    values = []
    for item in items:
        try:
            if isinstance(item, bool):
                raise TypeError
            value = float(item.strip() if isinstance(item, str) else item)
        except (TypeError, ValueError):
            raise DataError(f"{flag}: {item!r} is not a number; expected a comma-separated "
                            f"list such as 0,0.5,1,2") from None
        if not math.isfinite(value):
            raise DataError(f"{flag}: {item!r} is not a finite number")
        values.append(value)
    if len(set(values)) != len(values):
        dup = next(v for v in values if values.count(v) > 1)
        raise DataError(f"{flag}: {dup:g} is given twice")
    return tuple(values)


@dataclass(frozen=True)
class SweepConfig:
    """Everything ``vllm-align sweep`` needs, validated on construction.

    The ``option`` fields are the command's own flags (``vllm_align.fields``);
    the engine's (model, reference model, seed, dtype, ...) are vLLM's.
    """

    model: str = option(cli=False)
    reference_model: str = option(cli=False)
    prompts: str = option(help="one JSON object per line with 'prompt' or chat 'messages' "
                          "(optional 'id')", metavar="IN.jsonl")
    reward: str = option(help="the reward: " + REWARD_HELP, metavar="SPEC")
    output: str = option(help="CSV: method,parameter,n,mean,stderr per grid point",
                         metavar="OUT.csv")
    lambdas: tuple[float, ...] = option((), "DeRa lambda values, e.g. 0,0.5,1,2 (0 = reference, "
                                        "1 = aligned)", metavar="L1,L2,...", parse=str)
    alphas: tuple[float, ...] = option((), "AAD alpha values in (0, 1], e.g. 0.1",
                                       metavar="A1,A2,...", parse=str)
    plot: str | None = option(None, "reward-vs-lambda plot (default: --output with .png)",
                              metavar="OUT.png")
    responses_dir: str | None = option(None, "also write one JSONL of responses and rewards per "
                                       "grid point (the format `vllm-align eval` reads)",
                                       metavar="DIR")
    lora_adapter: LoraAdapter | None = lora_adapter_option()
    max_tokens: int = option(128, "new tokens per response")
    temperature: float = option(0.0, "0 = greedy (the papers' setting); when sampling, prompt i "
                                "uses --seed + i at every grid point")
    top_p: float = option(1.0, "nucleus sampling's p (with --temperature > 0)")
    seed: int = option(0, cli=False)
    dtype: str = option("auto", cli=False)
    max_model_len: int | None = option(None, cli=False)
    reward_batch_size: int = option(16, "texts per reward-model forward")
    progress: bool = option(True, "no progress bar")
    llm_kwargs: dict = option(default_factory=dict, cli=False)

    def __post_init__(self) -> None:
        # Frozen: normalised fields are set through object.__setattr__.
        object.__setattr__(self, "lora_adapter", LoraAdapter.parse(self.lora_adapter))
        object.__setattr__(self, "lambdas", parse_grid(self.lambdas, "--lambdas"))
        object.__setattr__(self, "alphas", parse_grid(self.alphas, "--alphas"))
        if not self.lambdas and not self.alphas:
            raise DataError("nothing to sweep: give --lambdas (e.g. 0,0.5,1,2) and/or --alphas "
                            "(e.g. 0.05,0.1,0.2)")
        for point in self.grid:     # the engine's own parameter checks, before it starts
            try:
                point.params
            except AlignConfigError as e:
                flag = "--lambdas" if point.method == "dera" else "--alphas"
                raise DataError(f"{flag}: {e}") from None
        if not self.reference_model:
            raise DataError("--reference-model is required: DeRa and AAD mix the aligned "
                            "model with it")
        if (self.lora_adapter is None and self.model     # no --model: the CLI says so
                and EngineAlignConfig(reference_model=self.reference_model).reference_is(
                    self.model)):
            raise DataError("--reference-model is --model: a LoRA pair, whose aligned model "
                            "is an adapter on it; give --lora-adapter [NAME=]PATH")
        if not self.reward or not self.reward.strip():
            raise DataError("--reward is required: a sequence-classification model path or "
                            "'module:function' / 'file.py:function'")
        if self.max_tokens < 1:
            raise DataError(f"--max-tokens must be >= 1, got {self.max_tokens}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise DataError(f"--temperature must be a finite number >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise DataError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.reward_batch_size < 1:
            raise DataError(f"--reward-batch-size must be >= 1, got {self.reward_batch_size}")
        if self.plot is None:
            object.__setattr__(self, "plot", str(Path(self.output).with_suffix(".png")))
        if Path(self.plot).resolve() == Path(self.output).resolve():
            raise DataError(f"--plot and --output are the same file: {self.output}")

    @property
    def grid(self) -> list[GridPoint]:
        return ([GridPoint("dera", v) for v in self.lambdas]
                + [GridPoint("aad", v) for v in self.alphas])


@dataclass(frozen=True)
class SweepRow:
    point: GridPoint
    n: int
    mean: float
    stderr: float

    def to_csv(self) -> dict[str, Any]:
        return {"method": self.point.method, "parameter": self.point.parameter,
                "n": self.n, "mean": self.mean, "stderr": self.stderr}


def summarize(grid: Sequence[GridPoint], scores: Sequence[float], n_prompts: int
              ) -> list[SweepRow]:
    """Rows from ``scores`` laid out ``[grid point][prompt]`` (length ``len(grid) * n_prompts``)."""
    if len(scores) != len(grid) * n_prompts:
        raise ValueError(f"{len(scores)} scores for {len(grid)} points x {n_prompts} prompts")
    return [SweepRow(point, *mean_sem(scores[k * n_prompts:(k + 1) * n_prompts]))
            for k, point in enumerate(grid)]


def write_csv(rows: Sequence[SweepRow], path: str | Path) -> None:
    """Floats are written in full precision (``repr``), NaN as ``nan``."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        writer.writerows(row.to_csv() for row in rows)


def plot_sweep(rows: Sequence[SweepRow], path: str | Path, *, title: str = "") -> None:
    """Mean reward vs lambda (DeRa) with AAD as horizontal lines; vs alpha if >= 2 alphas."""
    # Figure + Agg canvas directly: no pyplot global state, no display backend.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    dera = [r for r in rows if r.point.method == "dera"]
    aad = [r for r in rows if r.point.method == "aad"]
    panels = (["lambda"] if dera else []) + (["alpha"] if len(aad) >= 2 or not dera else [])
    fig = Figure(figsize=(5.5 * len(panels), 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    colors = ["tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink"]

    def err(r: SweepRow) -> float:
        return 0.0 if math.isnan(r.stderr) else r.stderr

    for ax, panel in zip(axes, panels):
        if panel == "lambda":
            ax.errorbar([r.point.parameter for r in dera], [r.mean for r in dera],
                        yerr=[err(r) for r in dera], marker="s", capsize=3, color="tab:blue",
                        label="DeRa")
            for i, r in enumerate(aad):
                c = colors[i % len(colors)]
                ax.axhline(r.mean, color=c, linestyle="--", label=f"AAD α={r.point.parameter:g}")
                ax.axhspan(r.mean - err(r), r.mean + err(r), color=c, alpha=0.15)
            ax.set_xlabel("λ (0 = reference, 1 = aligned)")
        else:
            ax.errorbar([r.point.parameter for r in aad], [r.mean for r in aad],
                        yerr=[err(r) for r in aad], marker="^", capsize=3, color="tab:orange",
                        label="AAD")
            ax.set_xlabel("α")
        ax.set_ylabel("mean reward (± s.e.)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    if title:
        fig.suptitle(title, fontsize="medium")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def _write_responses(out_dir: Path, grid: Sequence[GridPoint], items, prompts: Sequence[str],
                     responses: Sequence[str], scores: Sequence[float],
                     lora: LoraAdapter | None) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    n = len(items)
    for k, point in enumerate(grid):
        with open(out_dir / f"{point.label}.jsonl", "w", encoding="utf-8") as f:
            for j, it in enumerate(items):
                rec = {"id": it.id, "prompt": prompts[j], "response": responses[k * n + j],
                       "reward": scores[k * n + j], "method": point.method,
                       "parameter": point.parameter}
                if lora is not None:    # the aligned model these responses mixed in
                    rec["lora_adapter"] = lora.to_json()
                if it.messages is not None:   # eval frames them as the sweep's scorer did
                    rec["messages"] = it.messages
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")


def load_inputs(cfg: SweepConfig) -> list[PromptItem]:
    """Check the reward spec and read the prompts: everything that can fail
    before the engine's start-up."""
    from vllm_align.data.rewards import check_reward

    check_reward(cfg.reward)
    items = read_prompts(cfg.prompts)
    if not items:
        raise DataError(f"{cfg.prompts} holds no prompts")
    return items


@dataclass(frozen=True)
class Generations:
    """Engine output laid out ``[grid point][prompt]``."""

    prompts: list[str]       # per prompt, the text the model saw (chat-rendered)
    responses: list[str]     # len(grid) * len(prompts)
    tokens: int
    seconds: float


def generate_grid(llm, cfg: SweepConfig, items: Sequence[PromptItem]) -> Generations:
    """Every (grid point, prompt) request in ONE ``llm.generate`` call.

    ``llm`` is a ``vllm.LLM`` on ``cfg.model`` with ``cfg.reference_model`` as
    its reference (``run_sweep`` makes one; the demo passes its own). With
    ``cfg.lora_adapter`` every request carries its ``LoRARequest``.
    """
    from vllm import SamplingParams

    rendered = [render_prompt(llm.get_tokenizer(), it) for it in items]
    inputs, params = [], []
    for point in cfg.grid:
        spec = point.params.to_json()
        for it, (_, inp) in zip(items, rendered):
            inputs.append(inp)
            params.append(SamplingParams(
                max_tokens=cfg.max_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                # A per-request seed only matters when sampling.
                seed=cfg.seed + it.index if cfg.temperature > 0 else None,
                extra_args={EXTRA_ARGS_KEY: spec}))
    t0 = time.perf_counter()
    lora = cfg.lora_adapter.request() if cfg.lora_adapter is not None else None
    outputs = llm.generate(inputs, params, use_tqdm=cfg.progress, lora_request=lora)
    seconds = time.perf_counter() - t0
    return Generations(prompts=[text for text, _ in rendered],
                       responses=[o.outputs[0].text for o in outputs],
                       tokens=sum(len(o.outputs[0].token_ids) for o in outputs),
                       seconds=seconds)


def score_and_write(cfg: SweepConfig, items: Sequence[PromptItem], gen: Generations
                    ) -> list[SweepRow]:
    """Score every response, write the CSV, the PNG (and the responses); return the rows."""
    from vllm_align.data.rewards import load_reward

    grid = cfg.grid
    reward = load_reward(cfg.reward, batch_size=cfg.reward_batch_size)
    scored = [Prompt(it.id, text, messages=it.messages and tuple(it.messages))
              for it, text in zip(items, gen.prompts)]
    scores = reward(scored * len(grid), gen.responses)
    rows = summarize(grid, scores, len(items))
    write_csv(rows, cfg.output)
    aligned = Path(cfg.model).name + (f" + {cfg.lora_adapter.name}" if cfg.lora_adapter else "")
    plot_sweep(rows, cfg.plot, title=f"{aligned} vs {Path(cfg.reference_model).name}"
               f", reward {cfg.reward}")
    if cfg.responses_dir:
        _write_responses(Path(cfg.responses_dir), grid, items, gen.prompts, gen.responses,
                         scores, cfg.lora_adapter)
    return rows


def run_sweep(cfg: SweepConfig, engine_args=None, *, engines=None) -> list[SweepRow]:
    """Start the engine, generate the grid, free the engine, score and write; return the rows.

    ``engine_args``: a ``vllm.EngineArgs`` to start the engine from, unchanged (the
    command line's); else ``cfg``'s model, reference, dtype, ... (``build_llm``).
    ``engines``: instead of one engine, a callable taking ``build_llm``'s arguments
    and returning an object with ``generate_grid(cfg, items)`` and ``close()``, e.g.
    ``functools.partial(vllm_align.data.replicas.ReplicaPool, N)`` (N Ray actors,
    each generating the grid for a shard of the prompts).
    """
    items = load_inputs(cfg)
    check_lora_engine(cfg.lora_adapter, engine_args=engine_args, llm_kwargs=cfg.llm_kwargs)
    from vllm_align.data.engine import build_llm

    build = dict(model=cfg.model, reference_model=cfg.reference_model, dtype=cfg.dtype,
                 seed=cfg.seed, max_model_len=cfg.max_model_len, llm_kwargs=cfg.llm_kwargs,
                 engine_args=engine_args)
    if engines is not None:
        pool = engines(build)
        try:
            gen = pool.generate_grid(cfg, items)
        finally:
            pool.close()
    else:
        llm = build_llm(**build)
        try:
            gen = generate_grid(llm, cfg, items)
        finally:
            # The reward model loads only after the engine's memory is given back.
            del llm
            gc.collect()
    print(f"generated {len(gen.responses)} responses ({len(cfg.grid)} grid points x "
          f"{len(items)} prompts, {gen.tokens} tokens) in {gen.seconds:.1f}s, "
          f"{gen.tokens / max(gen.seconds, 1e-9):.1f} tok/s", file=sys.stderr)
    return score_and_write(cfg, items, gen)


def format_rows(rows: Sequence[SweepRow]) -> str:
    """A terminal table of the rows."""
    lines = [f"{'method':<7} {'parameter':>9} {'n':>6} {'mean':>10} {'stderr':>10}"]
    for r in rows:
        lines.append(f"{r.point.method:<7} {r.point.parameter:>9g} {r.n:>6d} "
                     f"{r.mean:>10.4f} {r.stderr:>10.4f}")
    return "\n".join(lines)
