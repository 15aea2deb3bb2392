class DataPrepError(Exception):
    """A problem with the user's input or options; its message is one line naming the file, row or option."""
