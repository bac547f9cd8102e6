"""The one exception type the command line turns into a readable line and a non-zero exit."""


class CdfaceError(Exception):
    """A user-facing error: bad input, bad configuration, a missing dependency.

    The message must be one sentence a user can act on; the CLI prints it without a traceback.
    """


def one_line(exc: BaseException) -> str:
    """The user-facing sentence of an error, also when a DataLoader worker re-raised it with its traceback."""
    message = str(exc).strip()
    if "Original Traceback" in message:
        message = message.splitlines()[-1].split(": ", 1)[-1]
    return " ".join(message.split())


def exit_on_error(main, prog: str = "cdface") -> None:
    """Run a program's main: a CdfaceError ends it with one line on stderr and exit status 2."""
    import sys

    try:
        main()
    except CdfaceError as exc:
        print(f"{prog}: error: {one_line(exc)}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        sys.exit(130)
