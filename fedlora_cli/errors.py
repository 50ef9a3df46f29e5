"""The one exception type users see.

Anything a user can get wrong (a missing file, a bad recipe key, a client update from another round, a
corrupted tensor file) is raised as :class:`FedloraError` with a message that names the problem. The CLI
turns it into one red line on stderr and exit code 1; ``FEDLORA_DEBUG=1`` shows the traceback instead.
"""


class FedloraError(Exception):
    """A problem with the user's input or on-disk state, explained in one line."""
