"""The one exception type for mistakes a user can make (paths, config keys, data)."""


class UserError(Exception):
    """A problem the user can fix. The CLI prints its message on one line and exits 2."""
