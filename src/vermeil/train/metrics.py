"""Training metrics on disk: JSON lines appended as the run goes, and a loss-curve PNG at the end.

`metrics.jsonl` holds one JSON object per line (`{"step": 10, "split": "train", "loss": 2.31, ...}`): any tool
reads it, a crashed run keeps every line written before the crash, and a resumed run first drops the lines past
its checkpoint so that the file continues exactly where the checkpoint left off. matplotlib is optional
(`pip install vermeil[plot]`) and imported only when a plot is drawn, with the Agg backend (no display needed).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["MetricsLogger", "bits_per_byte", "plot_loss_curve", "read_metrics", "truncate_metrics"]

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
    """Append metric rows to a JSON-lines file; the file is opened per write, so nothing is left open.

    Example:
        >>> log = MetricsLogger(run_dir / "metrics.jsonl")
        >>> log.log({"step": 1, "split": "train", "loss": 5.2})
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def log(self, row: Mapping[str, Any]) -> None:
        """Append one row (numbers, strings, bools; tensors are converted with `.item()`)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps({k: _plain(v) for k, v in row.items()}, allow_nan=False)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line + "\n")

    def rows(self) -> list[dict[str, Any]]:
        """Every row written so far."""
        return read_metrics(self.path)


def read_metrics(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Rows of a metrics file; a last line cut short by a crash is skipped. A missing file gives []."""
    p = Path(path)
    if not p.is_file():
        return []
    rows = []
    for line in p.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a partial line from a killed run
    return rows


def truncate_metrics(path: str | os.PathLike[str], last_step: int) -> int:
    """Drop the rows with `step > last_step` (written after the checkpoint a run resumes from), atomically.

    Returns the number of rows dropped.
    """
    from vermeil.checkpoint import atomic_write

    p = Path(path)
    if not p.is_file():
        return 0
    rows = read_metrics(p)
    kept = [r for r in rows if not isinstance(r.get("step"), int) or r["step"] <= last_step]
    dropped = len(rows) - len(kept)
    text = "".join(json.dumps(r) + "\n" for r in kept)
    with atomic_write(p, "w") as f:
        f.write(text)
    return dropped


def plot_loss_curve(
    rows: Sequence[Mapping[str, Any]],
    path: str | os.PathLike[str],
    *,
    keys: Sequence[str] = ("loss", "val_loss"),
    title: str | None = None,
    ylabel: str = "loss (nats per token)",
) -> bool:
    """Plot `keys` against `step` (train rows as a line, validation rows as markers) into a PNG, atomically.

    Returns False (and draws nothing) when matplotlib is not installed or there is nothing to plot.
    """
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
    from vermeil.checkpoint import atomic_path

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    try:
        for key, (xs, ys) in series.items():
            style = "-" if len(xs) > 20 else "-o"
            ax.plot(xs, ys, style, label=key, markersize=3, linewidth=1.2)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        if all(y > 0 for _, ys in series.values() for y in ys):
            ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        if title:
            ax.set_title(title)
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)
    return True
