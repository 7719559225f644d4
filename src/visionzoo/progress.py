"""Progress display: a tqdm bar on a terminal and in a Jupyter notebook (a widget), plain log
lines elsewhere (CI, nohup, files): at every log point the caller passes, and at least once every
LINE_EVERY_S seconds of a long phase (a k-NN feature pass, a validation, an inference), with
done/total, the rate and the time left.

Only rank 0 shows anything; other ranks get a silent tracker."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator

LINE_EVERY_S = 30.0  # lines mode: a phase that runs longer says where it is at least this often


def in_notebook() -> bool:
    """Whether this process is a Jupyter kernel (IPython's ZMQ shell)."""
    ipython = sys.modules.get("IPython")
    shell = getattr(ipython, "get_ipython", lambda: None)() if ipython is not None else None
    return type(shell).__name__ == "ZMQInteractiveShell"


def use_bar(mode: str) -> bool:
    """``auto`` shows a bar on a terminal and in a notebook, lines elsewhere."""
    return mode == "bar" or (mode == "auto" and (sys.stdout.isatty() or in_notebook()))


class Progress:
    """Wraps an iterable; ``update(**fields)`` refreshes the bar's postfix or, in line mode,
    prints one ``desc step i/n k=v ... ETA`` line (call it at the logging interval); in line
    mode a line also comes by itself when LINE_EVERY_S went by without one."""

    def __init__(self, iterable: Iterable, total: int, desc: str, mode: str = "auto", enabled: bool = True,
                 leave: bool = True, start: int = 0):
        """``start``: items already done before this session (a resumed epoch counts on from
        there: step 51/100, not 1/50); ``total`` counts them too."""
        self.iterable, self.total, self.desc, self.start = iterable, total, desc, start
        self.enabled = enabled and mode != "off"
        self.bar = None
        if self.enabled and use_bar(mode):
            from tqdm.auto import tqdm  # a widget in a notebook, text on a terminal

            self.bar = tqdm(total=total, initial=start, desc=desc, leave=leave, dynamic_ncols=True,
                            file=None if in_notebook() else sys.stdout)
        self.count, self.t0 = start, time.perf_counter()
        self.last_line = self.t0

    def __iter__(self) -> Iterator:
        for item in self.iterable:
            # Counted when handed out, so update() during its processing names this item.
            self.count += 1
            if self.bar is not None:
                self.bar.update(1)
            elif self.enabled and time.perf_counter() - self.last_line >= LINE_EVERY_S:
                self._line("")
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
        self._line(text)

    def _line(self, text: str) -> None:
        """``desc step i/n [fields] | rate | ETA`` on one line."""
        now = time.perf_counter()
        elapsed, done = now - self.t0, self.count - self.start  # in this session: the rate the ETA extrapolates
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = elapsed / done * (self.total - self.count) if done else 0.0
        fields = f" {text}" if text else ""
        print(f"{self.desc} step {self.count}/{self.total}{fields} | {rate:.3g} it/s | ETA {_duration(eta)}",
              flush=True)
        self.last_line = now

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
