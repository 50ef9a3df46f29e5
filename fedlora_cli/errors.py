"""The one exception type users see.

Anything a user can get wrong (a missing file, a bad recipe key, a client update from another round, a
corrupted tensor file) is raised as :class:`FedloraError` with a message that names the problem. The CLI
turns it into one red line on stderr and exit code 1; ``FEDLORA_DEBUG=1`` shows the traceback instead.
"""


class FedloraError(Exception):
    """A problem with the user's input or on-disk state, explained in one line."""


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message, or its class name when the message is empty."""
    text = str(exc).strip().splitlines()
    return text[0] if text else exc.__class__.__name__
