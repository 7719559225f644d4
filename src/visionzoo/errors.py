"""The one exception type for mistakes a user can make (paths, config keys, data)."""

from __future__ import annotations

from pathlib import Path


class UserError(Exception):
    """A problem the user can fix. The CLI prints its message on one line and exits 2.

    ``agreed``: every rank of the job met it together (distributed.raise_agreed); ``quiet``: rank
    0 says it, so this process exits 2 without printing it again."""

    def __init__(self, *args: object, quiet: bool = False, agreed: bool = False) -> None:
        super().__init__(*args)
        self.quiet, self.agreed = quiet, agreed


def first_line(err: BaseException) -> str:
    """The first non-blank line of an exception's message (its type name if it has none), for
    one-line error reports of library failures."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    return lines[0] if lines else type(err).__name__


class Stopped(UserError):
    """A run stopped by a signal after every rank wrote its part of a checkpoint: not a failure
    of the run, but it did not finish. The CLI prints one line (rank 0 only: ``quiet`` on the
    others) and exits with ``128 + signal number``, as a shell reports a process a signal ended:
    the same code for one process and for ``--devices N``."""

    def __init__(self, step: int, run_dir: str | Path, signum: int, note: str | None = None,
                 quiet: bool = False) -> None:
        super().__init__(f"stopped at step {step}", quiet=quiet, agreed=True)  # every rank stopped at this step
        self.step, self.run_dir, self.signum, self.note = step, run_dir, signum, note
        self.exit_code = 128 + signum
        self.resume_command = f"visionzoo train RECIPE --resume {run_dir}"  # the CLI fills in the recipe

    def __str__(self) -> str:
        line = f"stopped at step {self.step}; checkpoint saved; continue with: {self.resume_command}"
        return f"{line} ({self.note})" if self.note else line
