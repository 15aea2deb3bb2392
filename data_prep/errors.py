class DataPrepError(Exception):
    """A problem with the user's input or options; its message is one line naming the file, row or option."""


def one_line(exc: BaseException) -> str:
    """An unforeseen exception as a short one-line description: its type and the first line of its message."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
