"""Progress display: a tqdm bar on a terminal, plain log lines elsewhere (CI, nohup, files).

Only rank 0 shows anything; other ranks get a silent tracker."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator


def use_bar(mode: str) -> bool:
    """``auto`` shows a bar only when stdout is a terminal."""
    return mode == "bar" or (mode == "auto" and sys.stdout.isatty())


class Progress:
    """Wraps an iterable; ``update(**fields)`` refreshes the bar's postfix or, in line mode,
    prints one ``desc step i/n k=v ... ETA`` line (call it at the logging interval)."""

    def __init__(self, iterable: Iterable, total: int, desc: str, mode: str = "auto", enabled: bool = True,
                 leave: bool = True, start: int = 0):
        """``start``: items already done before this session (a resumed epoch counts on from
        there: step 51/100, not 1/50); ``total`` counts them too."""
        self.iterable, self.total, self.desc, self.start = iterable, total, desc, start
        self.enabled = enabled and mode != "off"
        self.bar = None
        if self.enabled and use_bar(mode):
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, desc=desc, leave=leave, dynamic_ncols=True, file=sys.stdout)
        self.count, self.t0 = start, time.perf_counter()

    def __iter__(self) -> Iterator:
        for item in self.iterable:
            # Counted when handed out, so update() during its processing names this item.
            self.count += 1
            if self.bar is not None:
                self.bar.update(1)
            yield item
        self.close()

    def update(self, **fields: float | str | None) -> None:
        """Show the given figures (loss, lr, img/s ...) for the current position."""
        if not self.enabled:
            return
        text = " ".join(f"{k} {_fmt(v)}" for k, v in fields.items() if v is not None)
        if self.bar is not None:
            self.bar.set_postfix_str(text, refresh=False)
            return
        elapsed = time.perf_counter() - self.t0
        done = self.count - self.start  # in this session: the rate the ETA extrapolates
        eta = elapsed / done * (self.total - self.count) if done else 0.0
        print(f"{self.desc} step {self.count}/{self.total} {text} | ETA {_duration(eta)}", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _fmt(v: float | str) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def _duration(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"
