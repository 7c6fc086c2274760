"""State-dict helpers shared by the model files' load hooks."""

from __future__ import annotations

from torch import Tensor


def fill_tied_keys(state_dict: dict[str, Tensor], first: str, second: str) -> None:
    """A tied model may be given a checkpoint holding only one of the two tied names: copy it to the other."""
    if first in state_dict and second not in state_dict:
        state_dict[second] = state_dict[first]
    elif second in state_dict and first not in state_dict:
        state_dict[first] = state_dict[second]
