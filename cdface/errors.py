"""The one exception type the command line turns into a readable line and a non-zero exit."""


class CdfaceError(Exception):
    """A user-facing error: bad input, bad configuration, a missing dependency.

    The message must be one sentence a user can act on; the CLI prints it without a traceback.
    """
