"""The one exception type for mistakes a user can make (paths, config keys, data)."""


class UserError(Exception):
    """A problem the user can fix. The CLI prints its message on one line and exits 2."""


def first_line(err: BaseException) -> str:
    """The first non-blank line of an exception's message (its type name if it has none), for
    one-line error reports of library failures."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    return lines[0] if lines else type(err).__name__
