"""The text task: bytes of local files as a language-modelling corpus, scored in bits per byte."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import torch
from torch import nn

from vermeil.config import ConfigError
from vermeil.data import ByteTokenizer, WindowSampler, load_text_corpus, sequential_windows
from vermeil.recipes.tasks import Run, TaskData, eval_token_batches
from vermeil.train.losses import lm_loss_fn

if TYPE_CHECKING:
    from vermeil.recipes.config import RunConfig

__all__ = ["TextData"]


@dataclass
class TextData(TaskData):
    """Bytes of local text files as a language-modelling corpus (byte tokens 0-255, `vermeil.data.ByteTokenizer`).

    Args:
        paths: files and folders; null means the Python standard library's source (found on any install).
        val_fraction: share of files held out for validation (a fixed hash of each file's name).
        max_bytes: cap on the bytes read (quick runs and tests); null reads everything (about 12 MB of stdlib).
    """

    task: Literal["text"] = "text"
    paths: list[str] | None = None
    suffixes: list[str] = field(default_factory=lambda: [".py"])
    val_fraction: float = 0.1
    max_bytes: int | None = None

    def __post_init__(self) -> None:
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction={self.val_fraction!r} must be in (0, 1)")
        if self.max_bytes is not None and self.max_bytes < 1024:
            raise ValueError(f"max_bytes={self.max_bytes!r} must be >= 1024 (or null for the whole corpus)")

    @property
    def vocab_size(self) -> int:
        return 256  # the byte values; the ByteTokenizer's BOS/EOS/PAD (256-258) never occur in the corpus

    # What loss.png's y axis shows: the mean next-byte cross-entropy (val_bpb is this over ln 2).
    loss_label = "cross-entropy (nats per byte)"

    def build(self, run: RunConfig, model: nn.Module) -> Run:
        """Random windows of the train split; validation loss and bits per byte on fixed windows."""
        train = run.train
        corpus = load_text_corpus(
            self.paths,
            val_fraction=self.val_fraction,
            max_bytes=self.max_bytes,
            suffixes=tuple(self.suffixes),
        )
        for split, tokens in (("train", corpus.train), ("validation", corpus.val)):
            if tokens.numel() < train.seq_len + 1:
                raise ConfigError(
                    f"the {split} corpus has {tokens.numel()} bytes, fewer than train.seq_len + 1 = "
                    f"{train.seq_len + 1} (raise data.max_bytes or lower train.seq_len)"
                )
        sampler = WindowSampler(corpus.train, train.batch_size, train.seq_len, seed=train.seed)
        val_batches = list(
            sequential_windows(corpus.val, train.batch_size, train.seq_len, train.eval_batches)
        )
        device = torch.device(train.device)

        def eval_fn(m: nn.Module) -> dict[str, float]:
            loss, _ = eval_token_batches(m, val_batches, device)
            return {"val_loss": loss, "val_bpb": loss / math.log(2.0)}

        extras = {"corpus_fingerprint": corpus.fingerprint, "train_bytes": corpus.train.numel()}
        return Run(run, model, sampler, lm_loss_fn(run.model), eval_fn, ByteTokenizer(), extras)
