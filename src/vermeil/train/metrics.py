"""Training metrics on disk (`metrics.jsonl`, one JSON object per line, and the loss-curve PNG) and on screen
(the window of steps between two log rows, the tqdm progress bar, one-line messages).

matplotlib is optional (`pip install vermeil[plot]`) and imported only when a plot is drawn.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from vermeil.checkpoint import atomic_path, atomic_write

__all__ = [
    "MetricsLogger",
    "MetricsWindow",
    "bits_per_byte",
    "echo",
    "format_row",
    "plot_loss_curve",
    "progress_bar",
    "read_metrics",
    "truncate_metrics",
]

LN2 = math.log(2.0)


def bits_per_byte(loss_nats: float, bytes_per_token: float = 1.0) -> float:
    """Cross-entropy in nats per token -> bits per byte (a byte tokenizer has one byte per token)."""
    return loss_nats / LN2 / bytes_per_token


def _plain(value: Any) -> Any:
    # Tensors and numpy scalars become Python numbers; NaN/inf are written as null (JSON has no NaN).
    if hasattr(value, "item") and callable(value.item):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricsLogger:
    """Append metric rows to a JSON-lines file, opened per write: a crashed run keeps every row written."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def log(self, row: Mapping[str, Any]) -> None:
        """Append one row (numbers, strings, bools; tensors are converted with `.item()`)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps({k: _plain(v) for k, v in row.items()}, allow_nan=False)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line + "\n")


def read_metrics(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Rows of a metrics file; a last line cut short by a crash, or a line that is no JSON object, is skipped.
    A missing file gives []."""
    p = Path(path)
    if not p.is_file():
        return []
    rows = []
    for line in p.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a partial line from a killed run (or an empty one)
        if isinstance(row, dict):  # every reader asks rows for keys
            rows.append(row)
    return rows


def truncate_metrics(path: str | os.PathLike[str], last_step: int) -> int:
    """Drop the rows with `step > last_step` (written after the checkpoint a run resumes from), atomically;
    returns how many."""
    p = Path(path)
    if not p.is_file():
        return 0
    rows = read_metrics(p)
    kept = [r for r in rows if not isinstance(r.get("step"), int) or r["step"] <= last_step]
    with atomic_write(p, "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in kept))
    return len(rows) - len(kept)


def _log_axis(ax: Any, values: Sequence[float]) -> None:
    """A readable log y axis: plain-number labels (0.3, 1.5, 2), intermediate ticks labelled when the values
    span under two decades, and the bottom at a labelled tick (a falling loss ends between two labels)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_yscale("log")
    lo, hi = min(values), max(values)
    narrow = hi / lo < 100
    subs = (1.0, 1.5, 2.0, 3.0, 5.0, 7.0) if narrow else (1.0, 2.0, 5.0)
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=subs))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.3g}"))
    ax.yaxis.set_minor_locator(LogLocator(base=10, subs=tuple(range(2, 10))))
    ax.yaxis.set_minor_formatter(NullFormatter())
    decade = 10.0 ** math.floor(math.log10(lo))
    floor = max((decade * s for s in subs if decade * s <= lo), default=decade)
    ax.set_ylim(bottom=floor)


def plot_loss_curve(
    rows: Sequence[Mapping[str, Any]],
    path: str | os.PathLike[str],
    *,
    keys: Sequence[str] = ("loss", "val_loss"),
    title: str | None = None,
    ylabel: str = "loss (nats per token)",
) -> bool:
    """Plot `keys` against `step` into a PNG, atomically; False (nothing drawn) without matplotlib or data."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)  # no display needed; keeps a backend the user already chose
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    series: dict[str, tuple[list[int], list[float]]] = {}
    for row in rows:
        step = row.get("step")
        for key in keys:
            value = row.get(key)
            if isinstance(step, int) and isinstance(value, (int, float)) and math.isfinite(value):
                xs, ys = series.setdefault(key, ([], []))
                xs.append(step)
                ys.append(float(value))
    if not series:
        return False
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    try:
        for key, (xs, ys) in series.items():
            ax.plot(xs, ys, "-" if len(xs) > 20 else "-o", label=key, markersize=3, linewidth=1.2)
        ax.set(xlabel="step", ylabel=ylabel, title=title or "")
        if all(y > 0 for _, ys in series.values() for y in ys):
            _log_axis(ax, [y for _, ys in series.values() for y in ys])
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)
    return True


class MetricsWindow:
    """Sums, on the device, of the steps since the last log row (saved in checkpoints, so a resumed run logs
    the same rows). A step not `ok` (non-finite, skipped) only counts in `skipped`."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.clear()

    def clear(self) -> None:
        self.loss = torch.zeros((), device=self.device)
        self.metrics: dict[str, Tensor] = {}
        self.skipped = torch.zeros((), device=self.device)
        self.steps = self.tokens = 0
        self.seconds = 0.0

    def add(
        self,
        loss: Tensor,
        metrics: Mapping[str, Tensor],
        tokens: int,
        seconds: float,
        ok: Tensor | None = None,
    ) -> None:
        if ok is not None:
            loss = torch.where(ok, loss, 0.0)
            metrics = {k: torch.where(ok, v, 0.0) for k, v in metrics.items()}
            self.skipped = self.skipped + (~ok).to(self.skipped.dtype)
        self.loss = self.loss + loss
        for k, v in metrics.items():
            self.metrics[k] = self.metrics[k] + v if k in self.metrics else v
        self.steps += 1
        self.tokens += tokens
        self.seconds += seconds

    def state_dict(self) -> dict[str, Any]:
        return {
            "loss": self.loss.detach().cpu(),
            "metrics": {k: v.detach().cpu() for k, v in self.metrics.items()},
            "skipped": self.skipped.detach().cpu(),
            "steps": self.steps,
            "tokens": self.tokens,
            "seconds": self.seconds,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.loss = state["loss"].to(self.device)
        self.metrics = {k: v.to(self.device) for k, v in state["metrics"].items()}
        self.skipped = state.get("skipped", torch.zeros(())).to(self.device)  # absent from older checkpoints
        self.steps, self.tokens = int(state["steps"]), int(state["tokens"])
        self.seconds = float(state["seconds"])


class _NoBar:
    """Stand-in for tqdm when it is not installed or the bar is off."""

    def update(self, *args: Any, **kwargs: Any) -> None:
        pass

    set_postfix = close = update


def progress_bar(total: int, initial: int, enabled: bool | None) -> Any:
    """A tqdm bar of `total` steps from `initial` (a stand-in without tqdm or when `enabled` is False)."""
    if enabled is False:
        return _NoBar()
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _NoBar()
    # disable=None: a bar on a terminal, nothing when stdout is a pipe or a file (logs stay clean).
    disable = None if enabled is None else False
    return tqdm(total=total, initial=initial, disable=disable, unit="step", dynamic_ncols=True, smoothing=0.1)


def echo(message: str) -> None:
    """Print a line on stderr without breaking the progress bar."""
    try:
        from tqdm.auto import tqdm

        tqdm.write(message, file=sys.stderr)
    except ImportError:
        print(message, file=sys.stderr)


def format_row(row: Mapping[str, Any]) -> str:
    """`loss 2.31 | lr 0.001`: a metrics row in one line."""
    return " | ".join(
        f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items() if k != "split"
    )
