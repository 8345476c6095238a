"""Training metrics: one CSV row per rollout, console lines, optional TensorBoard.

``metrics.csv`` columns are ``COLUMNS``; every row describes one rollout batch
(its episodes) and the SAC updates that followed it (their mean). Rows are
appended and flushed as they come; when a run resumes from a checkpoint, rows
written after that checkpoint (work that was lost) are dropped first, so the
file always describes one consistent run.
"""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path
from statistics import fmean
from typing import Any, Iterable, Mapping, Optional, Sequence

from vllm_align.train.rollout import RolloutBatch

COLUMNS = (
    "episodes",  # episodes completed, cumulative
    "transitions",  # agent decisions collected, cumulative
    "updates",  # SAC updates, cumulative
    "elapsed_s",  # training wall time, cumulative over resumes
    "worker",  # the rollout worker of this row
    "reward",  # mean R(x, y) over this rollout's episodes
    "cost",  # mean C(x, y)
    "terminal",  # mean α_r·R − α_c·C
    "kl",  # mean Σ_t log π_θ(t) − log π_ref(t) per episode
    "return",  # mean undiscounted Σ of transition rewards per episode
    "response_len",  # mean emitted tokens per episode
    "accept_rate",  # accepts / decisions
    "first_accept_rate",  # emitted tokens that were the first candidate
    "fallback_rate",  # emitted tokens forced as the last candidate
    "forwards_per_token",  # LLM one-token forwards per emitted token
    "buffer_size",  # transitions in the replay buffer
    "critic_loss", "actor_loss", "alpha_loss", "alpha", "entropy", "mean_q",  # SAC, mean
)
SAC_KEYS = ("critic_loss", "actor_loss", "alpha_loss", "alpha", "entropy", "mean_q")


def rollout_stats(batch: RolloutBatch) -> dict[str, float]:
    """Episode statistics of one rollout batch (the non-SAC metric columns)."""
    eps = batch.episodes
    tokens = sum(len(e.token_ids) for e in eps)
    decisions = sum(e.num_decisions for e in eps)
    return {
        "worker": batch.worker,
        "reward": fmean(e.reward for e in eps),
        "cost": fmean(e.cost for e in eps),
        "terminal": fmean(e.terminal for e in eps),
        "kl": fmean(e.kl for e in eps),
        "return": fmean(e.episode_return for e in eps),
        "response_len": tokens / len(eps),
        "accept_rate": sum(e.num_accepts for e in eps) / decisions if decisions else math.nan,
        "first_accept_rate": sum(c == 0 for e in eps for c in e.chosen) / max(tokens, 1),
        "fallback_rate": sum(e.num_fallbacks for e in eps) / max(tokens, 1),
        "forwards_per_token": batch.forwards / max(tokens, 1),
    }


def mean_sac(metrics: Sequence[Mapping[str, float]]) -> dict[str, float]:
    return {k: fmean(m[k] for m in metrics) if metrics else math.nan for k in SAC_KEYS}


def read_rows(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


class MetricsLog:
    """CSV (and optionally TensorBoard) sink for metric rows.

    Args:
        path: the CSV file.
        keep_until: on resume, the checkpoint's episode count: older rows are
            kept, later ones dropped. None: start a new file.
        tensorboard_dir: also write scalars there (needs ``tensorboard``).
    """

    def __init__(self, path: Path, keep_until: Optional[int] = None,
                 tensorboard_dir: Optional[Path] = None) -> None:
        self.path = path
        kept = [r for r in read_rows(path) if keep_until is not None
                and r.get("episodes", "").isdigit() and int(r["episodes"]) <= keep_until]
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(kept)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        self._file = open(path, "a", newline="")
        self._writer = csv.DictWriter(self._file, fieldnames=COLUMNS, extrasaction="ignore")
        self._tb = None
        if tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise RuntimeError("--tensorboard needs the `tensorboard` package, which is not "
                                   "installed (pip install tensorboard); metrics.csv has the "
                                   "same numbers") from None
            self._tb = SummaryWriter(str(tensorboard_dir))

    def write(self, row: Mapping[str, Any]) -> None:
        self._writer.writerow({k: _fmt(row.get(k)) for k in COLUMNS})
        self._file.flush()
        if self._tb is not None:
            for k in COLUMNS[4:]:
                v = row.get(k)
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(k, v, int(row["episodes"]))

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def _fmt(v: Any) -> Any:
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.6g}"
    return v


def console_line(row: Mapping[str, Any]) -> str:
    def f(key: str, spec: str = ".3f") -> str:
        v = row.get(key)
        return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)

    return (f"ep {row['episodes']:>7d}  upd {row['updates']:>7d}  reward {f('reward')}  "
            f"cost {f('cost')}  kl {f('kl')}  entropy {f('entropy')}  alpha {f('alpha')}  "
            f"critic {f('critic_loss')}  actor {f('actor_loss')}  accept {f('accept_rate', '.2f')}  "
            f"len {f('response_len', '.1f')}")


def plot_curve(csv_path: Path, png_path: Path, *, columns: Iterable[str] = ("reward", "kl"),
               title: str = "MARA SAC training", window: int = 5,
               baselines: Optional[Mapping[str, float]] = None) -> Path:
    """Learning curve PNG from metrics.csv: per-rollout values and a moving average."""
    from vllm_align.plotting import agg_figure

    rows = read_rows(csv_path)
    x = [int(r["episodes"]) for r in rows]
    columns = list(columns)
    fig = agg_figure(figsize=(5.5 * len(columns), 4))
    axes = fig.subplots(1, len(columns), squeeze=False)
    for ax, col in zip(axes[0], columns):
        y = [float(r[col]) if r[col] else math.nan for r in rows]
        smooth = [fmean(v for v in y[max(0, i - window + 1):i + 1] if not math.isnan(v))
                  if any(not math.isnan(v) for v in y[max(0, i - window + 1):i + 1])
                  else math.nan for i in range(len(y))]
        ax.plot(x, y, color="tab:blue", alpha=0.3, label=f"{col} (per rollout)")
        ax.plot(x, smooth, color="tab:blue", label=f"{col} (mean of {window})")
        if col == "reward" and baselines:
            for (name, value), color in zip(baselines.items(),
                                            ("tab:red", "tab:green", "tab:purple", "tab:gray")):
                ax.axhline(value, color=color, linestyle="--", label=name)
        ax.set_xlabel("episodes")
        ax.set_ylabel(col)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    return png_path
