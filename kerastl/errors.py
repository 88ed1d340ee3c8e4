"""The one exception kerastl raises for bad input."""


class KerastlError(ValueError):
    """A user-facing error: bad input, a missing file, an impossible setting.

    The CLI prints its message as one line and exits with code 2, so the message
    must be a complete sentence that says what to do.
    """
