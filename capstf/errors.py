"""The exceptions the CLI turns into one clear line on stderr and an exit code, the reason they
quote, and the one-line warnings of work that goes on."""
import sys


class CapstfError(Exception):
    """Bad usage or input the user can fix (a flag, a file, an incompatible model dir): exit 2."""
    exit_code = 2


class RuntimeFailure(CapstfError):
    """The input was fine but the work failed (unreachable server, full disk, a failed check): exit 1."""
    exit_code = 1


class Preempted(RuntimeFailure):
    """Training stopped on SIGTERM after checkpointing its last step; the same command resumes it."""
    exit_code = 143  # 128 + SIGTERM, what schedulers expect of a process that stopped on SIGTERM


def first_line(error) -> str:
    """The first line of an exception's message (TensorFlow's run on for pages), or its type's name
    if it has none: the reason to quote in a one-line error."""
    message = (getattr(error, "message", None) or str(error)).strip()
    return message.splitlines()[0][:500] if message else type(error).__name__


def warn(message):
    """A problem worked around (a damaged checkpoint skipped, metrics not saved): one line on stderr."""
    print(f"capstf: warning: {message}", file=sys.stderr, flush=True)
