"""Synthetic preference pairs: ``vllm-align generate-pairs``.

Prompts in (JSONL, one object per line with ``prompt`` or chat ``messages``),
pairs out in TRL's DPO format (JSONL: ``prompt``, ``chosen``, ``rejected``, plus
metadata). Each side is decoded by its own rule; by default, as in the AAD
paper's iterative DPO, ``chosen`` is AAD (alpha 0.1, greedy) and ``rejected`` is
nucleus sampling (p 0.9, temperature 1) of the aligned model.

Both sides of every prompt go to one engine, which is kept full: requests are
fed to vLLM's ``LLMEngine`` (``add_request``/``step``, the loop inside
``LLM.generate``) with a bounded number of prompts unfinished, and a prompt
whose two sides have finished is replaced at once. Batches of records are only
the unit of writing, so the engine never drains waiting for a batch's longest
sequence (measured in benchmarks/RESULTS.md against one bare ``LLM.generate``).

The output is crash-safe and resumable:

* records are appended in input order, ``batch_size`` at a time (the rest at
  the end), then ``fsync``-ed;
* on start, the existing output is read back; only complete (newline-ended),
  valid JSON records are kept, the first one per id; if anything else was
  there (a line torn by a kill, say), the file is rewritten atomically without
  it before anything is appended;
* prompts whose id already has a record are skipped;
* prompt ``i`` (0-based position in the input) is sampled with seed
  ``seed + i`` whatever the batch, so a resumed run writes the same records as
  an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from vllm_align.config import (EXTRA_ARGS_KEY, AlignConfigError, AlignParams,
                               EngineAlignConfig, finite_number, json_object)
from vllm_align.data.engine import (LORA_ADAPTER_HELP, LoraAdapter, check_lora_engine,
                                    lora_adapter_option)
from vllm_align.data.prompts import DataError, PromptItem, read_prompts, render_prompt
from vllm_align.fields import option

DEFAULT_CHOSEN = {"method": "aad", "alpha": 0.1}
DEFAULT_REJECTED = {"method": "none"}
# Sampling defaults per side when the spec names none.
CHOSEN_SAMPLING = {"temperature": 0.0, "top_p": 1.0}
REJECTED_SAMPLING = {"temperature": 1.0, "top_p": 0.9}
_SAMPLING_KEYS = ("temperature", "top_p")
LORA_ADAPTER_HELP_PAIRS = (LORA_ADAPTER_HELP + ". Records name it (lora_adapter: name, path); "
                           "an output made with another adapter, or none, is not resumed")


class PairsError(DataError):
    """Bad input, flags or output file for generate-pairs."""


@dataclass(frozen=True)
class SideSpec:
    """How one side of a pair is decoded: an alignment rule plus vLLM's sampling.

    A MARA side has no sampling of its own: MARA picks the emitted token itself
    (its ``top_p`` is the candidate nucleus), so it runs at temperature 0, top-p 1.
    """

    align: AlignParams
    temperature: float = 0.0
    top_p: float = 1.0

    def to_json(self) -> dict[str, Any]:
        """What is recorded as ``chosen_spec`` / ``rejected_spec``; ``parse_side`` of it
        gives this side back."""
        spec = self.align.to_json()
        if self.align.method != "mara":
            spec.update(temperature=self.temperature, top_p=self.top_p)
        return spec

    def sampling_params(self, max_tokens: int, seed: int):
        from vllm import SamplingParams

        return SamplingParams(max_tokens=max_tokens, temperature=self.temperature,
                              top_p=self.top_p, seed=seed,
                              extra_args={EXTRA_ARGS_KEY: self.align.to_json()})


def parse_side(spec: Any, *, side: str, defaults: Mapping[str, float]) -> SideSpec:
    """Parse ``--chosen``/``--rejected``: an alignment spec, optionally with
    ``temperature`` and ``top_p`` (else the side's defaults); for MARA, ``top_p`` is
    MARA's own and ``temperature`` is refused (it would change nothing)."""
    try:
        spec = json_object(spec, f"--{side}")
    except AlignConfigError as e:
        raise PairsError(str(e)) from None
    try:
        if spec.get("method") == "mara":
            if "temperature" in spec:
                raise AlignConfigError(
                    "'temperature' has no effect on a MARA side: the agent picks the emitted "
                    "token itself ('decisions': 'sampled' samples its decisions)")
            return SideSpec(AlignParams.parse(spec))
        sampling = {key: finite_number(spec[key], key) if key in spec else defaults[key]
                    for key in _SAMPLING_KEYS}
        align = AlignParams.parse({k: v for k, v in spec.items() if k not in _SAMPLING_KEYS})
    except AlignConfigError as e:
        raise PairsError(f"--{side}: {e}") from None
    if sampling["temperature"] < 0:
        raise PairsError(f"--{side} 'temperature' must be >= 0, got {sampling['temperature']!r}")
    if not 0.0 < sampling["top_p"] <= 1.0:
        raise PairsError(f"--{side} 'top_p' must be in (0, 1], got {sampling['top_p']!r}")
    return SideSpec(align, temperature=sampling["temperature"], top_p=sampling["top_p"])


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_done(path: str | os.PathLike) -> dict[Any, dict]:
    """Existing records by id, repairing the file first if it holds anything else.

    Kept: newline-ended lines that are JSON objects with an ``id`` (string or
    integer), ``chosen`` and ``rejected``, first per id. If anything is dropped
    (a torn last line, a bad or duplicate line) the file is replaced atomically
    by the kept lines.
    """
    path = Path(path)
    if not path.exists():
        return {}
    data = path.read_bytes()
    pieces = data.split(b"\n")
    changed = pieces[-1] != b""     # text after the last newline: a torn record
    kept: list[bytes] = []
    done: dict[Any, dict] = {}
    for raw in pieces[:-1]:
        try:
            rec = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            changed = True
            continue
        rid = rec.get("id") if isinstance(rec, dict) else None
        if (isinstance(rid, bool) or not isinstance(rid, (str, int)) or rid in done
                or not isinstance(rec.get("chosen"), str)
                or not isinstance(rec.get("rejected"), str)):
            changed = True
            continue
        done[rid] = rec
        kept.append(raw + b"\n")
    if changed:
        tmp = path.with_name(path.name + ".repair.tmp")
        with open(tmp, "wb") as f:
            f.write(b"".join(kept))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    return done


def _append(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    os.fsync(fd)


def _check_compatible(done: Mapping[Any, dict], expected: Mapping[str, Any],
                      seeds: Mapping[Any, int], out: str) -> None:
    """Refuse to extend an output made with other settings."""
    for rid, rec in done.items():
        for key, value in expected.items():
            if rec.get(key) != value:
                raise PairsError(
                    f"{out} already holds record id {rid!r} with {key}={rec.get(key)!r}, "
                    f"but this run has {key}={value!r}; use another --output or the same "
                    f"settings")
        if rid in seeds and rec.get("seed") != seeds[rid]:
            raise PairsError(f"{out} already holds record id {rid!r} with seed "
                             f"{rec.get('seed')!r}, but this run gives it seed {seeds[rid]}; "
                             f"use another --output or the same --seed")


@dataclass(frozen=True)
class Finished:
    """Both sides of ``todo[j]``, decoded: what a record is made of (plain data, so that
    a replica on another node can send it back)."""

    j: int
    prompt: str          # the text the model saw (chat-rendered)
    chosen: str
    rejected: str
    tokens: int          # generated, both sides


def finished_pairs(llm, todo: Sequence[PromptItem], chosen: SideSpec, rejected: SideSpec,
                   max_tokens: int, seeds: Mapping[Any, int], window: int,
                   lora: LoraAdapter | None = None) -> Iterator[Finished]:
    """Yield a ``Finished`` for ``todo[j]`` as soon as both of its sides have finished
    (completion order). With ``lora``, both sides of every prompt carry its
    ``LoRARequest`` (the aligned model is ``llm``'s model plus that adapter).

    At most ``window`` prompts are unfinished in the engine at any time; each
    finished prompt is replaced by the next one at once. If the consumer stops
    early (an error, Ctrl-C), the prompts still in the engine are aborted, so a
    caller's engine is left with nothing of ours in it.
    """
    from vllm.sampling_params import RequestOutputKind

    engine = llm.llm_engine
    tokenizer = llm.get_tokenizer()
    tag = f"pairs-{uuid.uuid4().hex[:8]}"       # our request ids: tag-j-side
    lora_request = lora.request() if lora is not None else None
    texts: dict[int, str] = {}
    sides: dict[int, list] = {}                 # j -> [chosen output, rejected output]
    nxt = 0
    try:
        while True:
            while nxt < len(todo) and len(sides) < window:
                text, inp = render_prompt(tokenizer, todo[nxt])
                prompt = {"prompt": inp} if isinstance(inp, str) else dict(inp)
                # Rendered by the engine's renderer, as LLM.generate does (raw prompts
                # to add_request are deprecated in vLLM 0.32); one input per request.
                inputs = engine.renderer.render_cmpl([prompt, dict(prompt)])
                for side, (spec, inp_side) in enumerate(zip((chosen, rejected), inputs)):
                    params = spec.sampling_params(max_tokens, seeds[todo[nxt].id])
                    params.output_kind = RequestOutputKind.FINAL_ONLY   # one output, at the end
                    engine.add_request(f"{tag}-{nxt}-{side}", inp_side, params,
                                       lora_request=lora_request)
                texts[nxt], sides[nxt] = text, [None, None]
                nxt += 1
            if not sides:
                return
            for out in engine.step():
                if not out.finished:
                    continue
                j, side = map(int, out.request_id.rsplit("-", 2)[1:])
                sides[j][side] = out.outputs[0]
                if None not in sides[j]:
                    c, r = sides.pop(j)
                    yield Finished(j, texts.pop(j), c.text, r.text,
                                   len(c.token_ids) + len(r.token_ids))
    finally:
        if sides:
            engine.abort_request([f"{tag}-{j}-{side}" for j, got in sides.items()
                                  for side in (0, 1) if got[side] is None])


def engine_window(llm, batch_size: int) -> int:
    """Prompts in flight on one engine: enough to refill every finished sequence's slot
    at once (2 requests per prompt: up to twice the engine's running batch)."""
    return max(batch_size, llm.llm_engine.vllm_config.scheduler_config.max_num_seqs)


class OneEngine:
    """The pairs of ``todo`` from one ``vllm.LLM``: the caller's, or one started from
    ``build`` (``build_llm``'s arguments) and shut down by ``close``."""

    def __init__(self, llm, build: Mapping[str, Any]):
        from vllm_align.data.engine import build_llm

        self.own = llm is None
        self.llm = build_llm(**build) if self.own else llm

    def pairs(self, todo, chosen, rejected, max_tokens, seeds, batch_size, lora=None
              ) -> Iterator[Finished]:
        return finished_pairs(self.llm, todo, chosen, rejected, max_tokens, seeds,
                              engine_window(self.llm, batch_size), lora)

    def close(self) -> None:
        if self.own:
            del self.llm


@dataclass(frozen=True)
class PairsResult:
    """What one run did: pairs written, tokens generated (both sides) and the seconds
    from the engine being ready to the last record synced (start-up excluded)."""

    written: int
    tokens: int
    seconds: float


@dataclass(frozen=True)
class PairsOptions:
    """``vllm-align generate-pairs``'s own options; its flags are these fields
    (``vllm_align.fields``), the engine's are vLLM's."""

    prompts: str = option(help="one JSON object per line with 'prompt' or chat 'messages' "
                          "(optional 'id'; default the line's index)", metavar="IN.jsonl")
    output: str = option(help="TRL DPO-format pairs; an existing file is resumed",
                         metavar="OUT.jsonl")
    chosen: Any = option(json.dumps(DEFAULT_CHOSEN), "alignment spec of the chosen side, "
                         "optionally with 'temperature' and 'top_p' (AAD alpha 0.1, greedy); "
                         "a MARA side takes MARA's parameters only",
                         metavar="JSON", parse=str)
    rejected: Any = option(json.dumps(DEFAULT_REJECTED), "alignment spec of the rejected side, "
                           "optionally with 'temperature' and 'top_p' (the aligned model, "
                           "nucleus p 0.9, temperature 1)", metavar="JSON", parse=str)
    lora_adapter: LoraAdapter | None = lora_adapter_option(LORA_ADAPTER_HELP_PAIRS)
    max_tokens: int = option(256, "most new tokens per side")
    batch_size: int = option(64, "records per append + fsync (the engine is kept full "
                             "regardless)")
    progress: bool = option(True, "no progress bar")

    def __post_init__(self) -> None:
        # Frozen: the parsed adapter is set through object.__setattr__.
        object.__setattr__(self, "lora_adapter", LoraAdapter.parse(self.lora_adapter))
        if self.max_tokens < 1:
            raise PairsError(f"--max-tokens must be >= 1, got {self.max_tokens}")
        if self.batch_size < 1:
            raise PairsError(f"--batch-size must be >= 1, got {self.batch_size}")


def _engine_agents(engine_args, llm, llm_kwargs) -> dict[str, str]:
    """The MARA agents ({name: path}) of the engine that will decode: the command line's
    (``engine_args``), the caller's ``llm``'s, or ``build_llm``'s (``llm_kwargs``)."""
    if engine_args is not None:
        config = engine_args.additional_config
    elif llm is not None:
        config = llm.llm_engine.vllm_config.additional_config
    else:
        config = (llm_kwargs or {}).get("additional_config")
    return dict(EngineAlignConfig.parse(config).mara_agents)


def generate_pairs(*, model: str, reference_model: str | None, seed: int = 0,
                   dtype: str = "auto", max_model_len: int | None = None,
                   llm_kwargs: Mapping[str, Any] | None = None, engine_args=None, llm=None,
                   engines=None, **options) -> PairsResult:
    """Write one pair per prompt to ``options["output"]`` (resuming it); returns what this
    run did. ``options``: the fields of ``PairsOptions`` (``prompts`` and ``output``
    required).

    ``engine_args``: a ``vllm.EngineArgs`` on ``model`` (with ``reference_model``)
    to start the engine from, unchanged (the command line's); ``dtype``,
    ``max_model_len`` and ``llm_kwargs`` are then ignored.
    ``llm``: an existing ``vllm.LLM`` on ``model`` (with ``reference_model`` as
    its reference) to use instead of starting one; the caller keeps the engine.
    ``engines``: decode elsewhere than on one engine: a callable taking ``build_llm``'s
    arguments and returning an object with ``pairs`` and ``close`` as ``OneEngine``'s
    (``pairs`` gets the run's ``LoraAdapter`` or None last),
    e.g. ``functools.partial(vllm_align.data.replicas.ReplicaPool, N)`` (N Ray actors).
    This process alone writes the output, so everything above holds unchanged.
    """
    opts = PairsOptions(**options)
    prompts, output, max_tokens, batch_size = (opts.prompts, opts.output, opts.max_tokens,
                                               opts.batch_size)
    if engines is not None and llm is not None:
        raise PairsError("engines start their own engines; pass llm or engines, not both")
    chosen_spec = parse_side(opts.chosen, side="chosen", defaults=CHOSEN_SAMPLING)
    rejected_spec = parse_side(opts.rejected, side="rejected", defaults=REJECTED_SAMPLING)
    agents = _engine_agents(engine_args, llm, llm_kwargs)
    adapter = opts.lora_adapter
    check_lora_engine(adapter, engine_args=engine_args, llm=llm, llm_kwargs=llm_kwargs)
    engine = EngineAlignConfig(reference_model=reference_model or None, mara_agents=agents)
    for side, spec in (("chosen", chosen_spec), ("rejected", rejected_spec)):
        try:    # the engine's own check, before it starts
            engine.check_servable(spec.align, what="this side")
        except AlignConfigError as e:
            raise PairsError(f"--{side}: {e}") from None
        if adapter is None and spec.align.needs_reference and engine.reference_is(model):
            raise PairsError(f"--{side}: {spec.align.method!r} on a LoRA pair (--reference-model "
                             f"is --model) needs an adapter as the aligned model: give "
                             f"--lora-adapter [NAME=]PATH")

    items = read_prompts(prompts)
    meta = {"chosen_spec": chosen_spec.to_json(), "rejected_spec": rejected_spec.to_json(),
            "max_tokens": max_tokens, "model": model, "reference_model": reference_model,
            # Always there (null without one): a resume with an adapter then refuses an
            # output made without one, and the reverse.
            "lora_adapter": adapter.to_json() if adapter is not None else None}
    if "mara" in (chosen_spec.align.method, rejected_spec.align.method):
        meta["mara_agents"] = dict(agents)   # an agent's name alone does not say what it was
    seeds = {it.id: seed + it.index for it in items}
    done = load_done(output)
    _check_compatible(done, meta, seeds, output)
    todo = [it for it in items if it.id not in done]
    n_done = len(items) - len(todo)
    if not todo:
        print(f"all {len(items)} prompts already have pairs in {output}", file=sys.stderr)
        return PairsResult(written=0, tokens=0, seconds=0.0)

    from tqdm import tqdm

    build = dict(model=model, reference_model=reference_model, dtype=dtype, seed=seed,
                 max_model_len=max_model_len, llm_kwargs=llm_kwargs, engine_args=engine_args)
    engines = engines(build) if engines is not None else OneEngine(llm, build)
    written = 0
    n_tokens = 0
    ready: dict[int, str] = {}      # finished records not yet written, by position in todo
    t0 = time.perf_counter()
    out_path = Path(output)
    created = not out_path.exists()
    fd = os.open(out_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    if created:
        _fsync_dir(out_path.parent.resolve())
    bar = tqdm(total=len(items), initial=n_done, unit="prompt", desc="pairs",
               dynamic_ncols=True, disable=not opts.progress)
    pairs = engines.pairs(todo, chosen_spec, rejected_spec, max_tokens, seeds, batch_size,
                          adapter)
    try:
        with contextlib.closing(pairs):
            for done_pair in pairs:
                j, it = done_pair.j, todo[done_pair.j]
                n_tokens += done_pair.tokens
                rec = {"id": it.id, "prompt": done_pair.prompt, "chosen": done_pair.chosen,
                       "rejected": done_pair.rejected, **meta, "seed": seeds[it.id]}
                if it.messages is not None:   # eval's reward models frame these turns
                    rec["messages"] = it.messages
                ready[j] = json.dumps(rec, ensure_ascii=False) + "\n"
                # Write in input order: the finished records that directly follow
                # the written ones, once there are batch_size of them (all at the end).
                run = 0
                while written + run in ready:
                    run += 1
                if run >= batch_size or written + run == len(todo):
                    _append(fd, "".join(ready.pop(written + k) for k in range(run))
                            .encode("utf-8"))
                    written += run
                    bar.update(run)
                    elapsed = max(time.perf_counter() - t0, 1e-9)
                    bar.set_postfix_str(f"{n_tokens / elapsed:.1f} tok/s")
        elapsed = time.perf_counter() - t0
    finally:
        bar.close()
        os.close(fd)
        engines.close()
    print(f"wrote {written} pairs to {output} ({n_done} already there; "
          f"{written / elapsed:.2f} prompts/s, {n_tokens / elapsed:.1f} tok/s)", file=sys.stderr)
    return PairsResult(written=written, tokens=n_tokens, seconds=elapsed)
