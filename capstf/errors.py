"""The one exception type the CLI turns into a clear message and a non-zero exit."""


class CapstfError(Exception):
    """A problem the user can fix (bad flag, missing file, incompatible model dir)."""
