"""Undecodable images of a split, named: each file counted once however many epochs read it, so
the count is the same every run; the first few names go into the warning and results.json."""

from __future__ import annotations

from typing import Any

SHOWN = 10  # names listed per split


class BadImages:
    """Distinct names of the undecodable images a reader reported (``data.folder.Unreadable``
    counts carry them), plus a count of those reported without a name (readers that give none)."""

    def __init__(self) -> None:
        self.names: set[str] = set()
        self.unnamed = 0

    def add(self, n_bad: Any) -> None:
        """Take a batch's unreadable count (an int, or an Unreadable with names)."""
        names = getattr(n_bad, "names", ())
        self.names.update(names)
        self.unnamed += int(n_bad) - len(names)

    @property
    def count(self) -> int:
        return len(self.names) + self.unnamed

    def first(self, k: int = SHOWN) -> list[str]:
        return sorted(self.names)[:k]

    def over_ranks(self) -> BadImages:
        """The images every rank reported (a collective when distributed): names joined, so a
        file two ranks read in different epochs counts once; unnamed counts summed."""
        import torch.distributed as dist

        if not (dist.is_initialized() and dist.get_world_size() > 1):
            return self
        states: list = [None] * dist.get_world_size()
        dist.all_gather_object(states, self.state())
        out = BadImages()
        for s in states:
            out.names.update(s["names"])
            out.unnamed += int(s["unnamed"])
        return out

    def state(self) -> dict:
        return {"names": sorted(self.names), "unnamed": self.unnamed}

    def load(self, state: dict | None) -> None:
        if state:
            self.names, self.unnamed = set(state.get("names", [])), int(state.get("unnamed", 0))


def describe(split: str, count: int, names: list[str]) -> str:
    """``train 2 (a.jpg, b.jpg)``: one split's part of the unreadable-images warning."""
    more = count - len(names)
    shown = ", ".join(names) + (f", and {more} more" if names and more > 0 else "")
    return f"{split} {count}" + (f" ({shown})" if shown else "")
