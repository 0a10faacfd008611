"""User-facing errors: the CLI prints their message and exits with status 2, no traceback."""


class AvatarError(Exception):
    """A problem with the user's input or request; the message says what and where."""

    exit_code = 2


class OutputExistsError(AvatarError):
    """The output path exists and --force was not given."""
