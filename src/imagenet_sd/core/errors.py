"""The one exception type a user is meant to read.

Anything raised as `UserError` is printed as a single line, without a traceback,
and the stage exits with status 2 (see `cli.run_stage`). Its message says what is
wrong and how to fix it.
"""


class UserError(Exception):
    """Bad input from the user: params, files or folders. Message is one line."""


def param_error(key: str, value, allowed: str) -> UserError:
    return UserError(f"params.yaml: {key} = {value!r} is not valid; allowed: {allowed}")


def missing_path(key: str, path, what: str = "file or folder") -> UserError:
    return UserError(
        f"params.yaml: {key} = {str(path)!r}: no such {what}; "
        f"create it or point {key} at an existing one"
    )


def first_line(exc: Exception) -> str:
    """The gist of a library's exception for a one-line UserError: its first line, or its type if silent."""
    return str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
