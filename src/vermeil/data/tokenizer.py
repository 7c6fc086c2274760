"""Byte-level tokenizer: UTF-8 bytes are the tokens 0..255, plus BOS, EOS and PAD at 256, 257, 258.

Nothing to train, ship or download; lossless for any text. The cost is about 3x longer sequences
than a trained BPE. Axis legend: B batch, L padded length.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Literal

import torch
from torch import Tensor

__all__ = ["ByteTokenizer"]


class ByteTokenizer:
    """UTF-8 bytes as token ids, with three special tokens above the byte range.

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

    @property
    def vocab_size(self) -> int:
        """259: the 256 byte values and the three special tokens."""
        return 259

    @property
    def special_ids(self) -> tuple[int, int, int]:
        return (self.bos_id, self.eos_id, self.pad_id)

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Token ids of `text`: its UTF-8 bytes, with BOS first and/or EOS last when asked."""
        if not isinstance(text, str):
            raise TypeError(f"text must be str, got {type(text).__name__}")
        ids = list(text.encode("utf-8"))
        if bos:
            ids.insert(0, self.bos_id)
        if eos:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: Iterable[int] | Tensor) -> str:
        """Text of `ids` (a list or a 1-D tensor); special tokens are skipped.

        Byte sequences that are not valid UTF-8 (possible in sampled text) decode to U+FFFD instead of raising.
        """
        if isinstance(ids, Tensor):
            if ids.dim() != 1:
                raise ValueError(
                    f"decode takes a 1-D tensor of ids, got shape {tuple(ids.shape)}; use decode_batch"
                )
            ids = ids.tolist()
        out = bytearray()
        for i in ids:
            i = int(i)
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i} is outside the vocabulary [0, {self.vocab_size})")
            if i < 256:
                out.append(i)
        return out.decode("utf-8", errors="replace")

    def decode_batch(self, ids: Tensor | Sequence[Sequence[int]]) -> list[str]:
        """Decode each row of a (B, L) tensor or a list of id lists (padding is skipped with the specials)."""
        rows = ids.tolist() if isinstance(ids, Tensor) else ids
        return [self.decode(row) for row in rows]

    def encode_batch(
        self,
        texts: Sequence[str],
        bos: bool = False,
        eos: bool = False,
        padding_side: Literal["left", "right"] = "right",
    ) -> tuple[Tensor, Tensor]:
        """Encode several texts into one padded batch.

        Args:
            texts: B strings.
            padding_side: "right" for training batches, "left" for prompts to generate from (so that every row
                ends at the last position).

        Returns:
            ids: (B, L) int64, PAD where a row is shorter than the longest one.
            mask: (B, L) bool, True on real tokens (BOS/EOS included), False on padding.
        """
        if isinstance(texts, str):
            raise TypeError("encode_batch takes a list of strings, got one str; use encode")
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side={padding_side!r} must be 'left' or 'right'")
        rows = [self.encode(t, bos=bos, eos=eos) for t in texts]
        length = max((len(r) for r in rows), default=0)
        ids = torch.full((len(rows), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.bool)
        for b, row in enumerate(rows):  # one copy per row, not per token
            n = len(row)
            if n == 0:
                continue
            sl = slice(0, n) if padding_side == "right" else slice(length - n, length)
            ids[b, sl] = torch.tensor(row, dtype=torch.long)
            mask[b, sl] = True
        return ids, mask
