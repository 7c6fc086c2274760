"""Tokenizers: the byte-level tokenizer of Vermeil's own runs, and a run folder's `tokenizer.json`.

Axis legend: B batch, L padded length.
"""

from __future__ import annotations

import json
import operator
import os
import shutil
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

import torch
from torch import Tensor

__all__ = [
    "TOKENIZER_FILE",
    "TOKENIZER_FILES",
    "ByteTokenizer",
    "JSONTokenizer",
    "copy_tokenizer_files",
    "describe_tokenizer",
    "load_tokenizer",
    "tokenizer_path",
]

_T = TypeVar("_T")

TOKENIZER_FILE = "tokenizer.json"
# What `vermeil convert` copies beside the weights: the tokenizer, and transformers' settings naming its EOS token.
TOKENIZER_FILES = (TOKENIZER_FILE, "tokenizer_config.json")


def _int_ids(ids: Iterable[object]) -> list[int]:
    """`ids` as Python ints; a float (a truncated id), a bool or a nested list raises TypeError naming it."""
    out = []
    for i in ids:
        if isinstance(i, bool):
            raise TypeError(f"token ids must be integers, got {i!r}")
        try:
            out.append(operator.index(i))  # ints, NumPy integers; not 97.7
        except TypeError:
            raise TypeError(f"token ids must be integers, got {i!r}") from None
    return out


class ByteTokenizer:
    """UTF-8 bytes as the tokens 0..255, plus BOS, EOS and PAD at 256, 257, 258: nothing to train, ship or
    download, lossless for any bytes, at about 3x the length of a trained BPE.

    Example:
        >>> tok = ByteTokenizer()
        >>> tok.encode("hé", bos=True)
        [256, 104, 195, 169]
        >>> tok.decode([256, 104, 195, 169])
        'hé'
    """

    bos_id: int = 256
    eos_id: int = 257
    pad_id: int = 258
    vocab_size: int = 259

    @property
    def special_ids(self) -> tuple[int, int, int]:
        return (self.bos_id, self.eos_id, self.pad_id)

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Token ids of `text`'s UTF-8 bytes, with BOS first and/or EOS last when asked."""
        if not isinstance(text, str):
            raise TypeError(f"text must be str, got {type(text).__name__}")
        return self.encode_bytes(text.encode("utf-8"), bos=bos, eos=eos)

    def encode_bytes(self, data: bytes, bos: bool = False, eos: bool = False) -> list[int]:
        """Token ids of any bytes, UTF-8 or not."""
        if not isinstance(data, (bytes, bytearray)):
            raise TypeError(f"data must be bytes, got {type(data).__name__}")
        return ([self.bos_id] if bos else []) + list(data) + ([self.eos_id] if eos else [])

    def decode(self, ids: Iterable[int] | Tensor) -> str:
        """Text of `ids` (a list or a 1-D tensor), special tokens skipped; invalid UTF-8 decodes to U+FFFD."""
        if isinstance(ids, Tensor):
            if ids.dim() != 1:
                raise ValueError(
                    f"decode takes a 1-D tensor of ids, got shape {tuple(ids.shape)}; use decode_batch"
                )
            ids = ids.tolist()
        ids = _int_ids(ids)
        if bad := [i for i in ids if not 0 <= i < self.vocab_size]:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})")
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def decode_batch(self, ids: Tensor | Sequence[Sequence[int]]) -> list[str]:
        """Decode each row of a (B, L) tensor or a list of id lists (padding is skipped with the specials)."""
        if isinstance(ids, Tensor) and ids.dim() != 2:
            raise ValueError(
                f"decode_batch takes a (B, L) tensor of ids, got shape {tuple(ids.shape)}; use decode"
            )
        rows = ids.tolist() if isinstance(ids, Tensor) else ids
        return [self.decode(row) for row in rows]

    def encode_batch(
        self,
        texts: Sequence[str],
        bos: bool = False,
        eos: bool = False,
        padding_side: Literal["left", "right"] = "right",
    ) -> tuple[Tensor, Tensor]:
        """B texts -> ids (B, L) int64 padded with PAD, and mask (B, L) bool, True on real tokens (BOS/EOS too).

        padding_side: "right" for training batches, "left" for prompts (every row ends at the last position).
        """
        if isinstance(texts, str):
            raise TypeError("encode_batch takes a list of strings, got one str; use encode")
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side={padding_side!r} must be 'left' or 'right'")
        rows = [self.encode(t, bos=bos, eos=eos) for t in texts]
        length = max((len(r) for r in rows), default=0)
        ids = torch.full((len(rows), length), self.pad_id, dtype=torch.long)
        for b, row in enumerate(rows):  # one copy per row, not per token
            sl = slice(0, len(row)) if padding_side == "right" else slice(length - len(row), length)
            ids[b, sl] = torch.tensor(row, dtype=torch.long)
        return ids, ids != self.pad_id  # encode never yields PAD


class JSONTokenizer:
    """A Hugging Face `tokenizer.json` (BPE, WordPiece, Unigram, ...) through the optional `tokenizers` library.
    The file is data: loading it parses JSON and runs nothing from it.

    `eos_token`: the EOS token's text (transformers' tokenizer_config.json `eos_token`), or None. Raises
    ImportError without `tokenizers`, ValueError for a file it cannot read.
    """

    def __init__(self, path: str | os.PathLike[str], eos_token: str | None = None) -> None:
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise ImportError(
                f"{os.fspath(path)} needs the tokenizers library: pip install 'vermeil[tokenizers]'"
            ) from None
        self.path = Path(path)
        self._tok = self._call("is not a readable tokenizer.json", Tokenizer.from_file, os.fspath(path))
        self.eos_id: int | None = self._tok.token_to_id(eos_token) if eos_token else None

    def _call(self, failure: str, fn: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
        """fn(*args, **kwargs); what the file makes the tokenizers library raise is one ValueError naming it: a
        plain Exception (an unknown-token rule the vocabulary breaks) or a Rust panic (pyo3's PanicException, a
        BaseException: a pre-tokenizer regex past its backtracking limit)."""
        try:
            return fn(*args, **kwargs)
        except BaseException as e:
            if not isinstance(e, Exception) and type(e).__name__ != "PanicException":
                raise  # KeyboardInterrupt, SystemExit
            first = " ".join(str(e).split())
            raise ValueError(f"{os.fspath(self.path)} {failure}: {first}") from None

    @property
    def vocab_size(self) -> int:  # added tokens included
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (without the special tokens a post-processor would add)."""
        if not isinstance(text, str):
            raise TypeError(f"text must be str, got {type(text).__name__}")
        return list(
            self._call("fails to encode the text", self._tok.encode, text, add_special_tokens=False).ids
        )

    def decode(self, ids: Iterable[int] | Tensor) -> str:
        """Text of `ids` (a list or a 1-D tensor); special tokens are skipped."""
        if isinstance(ids, Tensor):
            if ids.dim() != 1:
                raise ValueError(f"decode takes a 1-D tensor of ids, got shape {tuple(ids.shape)}")
            ids = ids.tolist()
        ids = _int_ids(ids)
        if bad := [i for i in ids if i < 0]:
            raise ValueError(f"token id {bad[0]} must be >= 0")
        return self._call("fails to decode the ids", self._tok.decode, ids, skip_special_tokens=True)


def _eos_token(folder: Path) -> str | None:
    # transformers writes the EOS token's text into tokenizer_config.json (a string or an AddedToken dict).
    path = folder / "tokenizer_config.json"
    if not path.is_file():  # absent, or a FIFO / device a run folder may hold: reading it would block forever
        return None
    try:  # RecursionError: a crafted file of nested brackets
        value = json.loads(path.read_text(encoding="utf-8")).get("eos_token")
    except (OSError, ValueError, AttributeError, RecursionError):
        return None
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def tokenizer_path(
    run_dir: str | os.PathLike[str], checkpoint: str | os.PathLike[str] | None = None
) -> Path | None:
    """The tokenizer.json the weights of a run read, or None when they read bytes.

    A run folder's tokenizer.json (a converted model's) belongs to weights without a record of their own; the
    trainer records `tokenizer: bytes` in every model.safetensors it writes, so a converted model trained further
    decodes with bytes. `checkpoint`: the checkpoint folder used (default: the newest intact one, as `vermeil
    generate`). Raises ValueError when the weights record a tokenizer other than "bytes".
    """
    from vermeil.checkpoint import read_metadata
    from vermeil.runs import TOKENIZER_KEY, WEIGHTS, latest_checkpoint

    path = Path(run_dir) / TOKENIZER_FILE
    if not path.is_file():
        return None
    try:
        folder = Path(checkpoint) if checkpoint is not None else latest_checkpoint(run_dir)
    except FileNotFoundError:
        return path  # no weights (yet): the folder's tokenizer is all there is
    record = read_metadata(folder / WEIGHTS).get(TOKENIZER_KEY)
    if record not in (None, "bytes"):
        raise ValueError(
            f"{os.fspath(folder / WEIGHTS)} records {TOKENIZER_KEY}={record!r}; only 'bytes' is known"
        )
    return None if record == "bytes" else path


def load_tokenizer(
    run_dir: str | os.PathLike[str], checkpoint: str | os.PathLike[str] | None = None
) -> ByteTokenizer | JSONTokenizer:
    """The tokenizer of a run's weights: `JSONTokenizer` of `tokenizer_path(...)`, else `ByteTokenizer`."""
    path = tokenizer_path(run_dir, checkpoint)
    return JSONTokenizer(path, eos_token=_eos_token(path.parent)) if path else ByteTokenizer()


def describe_tokenizer(run_dir: str | os.PathLike[str]) -> str:
    """One line saying which tokenizer `load_tokenizer(run_dir)` uses (without loading it)."""
    path = tokenizer_path(run_dir)
    if path is not None:
        return f"{os.fspath(path)} (the tokenizers library)"
    return "bytes (ByteTokenizer: UTF-8 bytes 0-255, BOS/EOS/PAD 256-258)"


def copy_tokenizer_files(src: str | os.PathLike[str], dest: str | os.PathLike[str]) -> list[str]:
    """Copy the `TOKENIZER_FILES` present (none without a tokenizer.json) into `dest`; returns their names."""
    src, dest = Path(src), Path(dest)
    if not (src / TOKENIZER_FILE).is_file():
        return []
    dest.mkdir(parents=True, exist_ok=True)
    copied = [name for name in TOKENIZER_FILES if (src / name).is_file()]
    for name in copied:
        shutil.copyfile(src / name, dest / name)
    return copied
