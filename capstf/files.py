"""Files that another process may read at any moment, or a later run read back: written whole
or not at all."""
import json
import os
from pathlib import Path

from capstf.errors import CapstfError, RuntimeFailure


def write_atomically(path, write):
    """Calls write(scratch), which creates the file at the Path `scratch` beside `path`, then renames
    it to `path`, so that a reader sees the old file or the new one, never a partial one: a worker
    reads config.json while the chief rewrites it at every start, and a rerun reads what a killed
    run was writing. A missing folder is a CapstfError; a write that fails (a full disk, a
    read-only folder) is a RuntimeFailure that leaves the old file as it was and no scratch file."""
    path = Path(path)
    folder = path.resolve().parent
    if not folder.is_dir():
        raise CapstfError(f"Cannot write {path}: folder {folder} does not exist.")
    scratch = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(scratch)
        os.replace(scratch, path)  # atomic within one file system
    except OSError as e:
        scratch.unlink(missing_ok=True)
        raise RuntimeFailure(f"Cannot write {path} ({e.strerror or e}); what was there before is "
                             "unchanged: free space or fix the folder, then rerun.") from None


def write_text(path, text):
    """Writes `text` to `path` with `write_atomically`."""
    write_atomically(path, lambda scratch: scratch.write_text(text))


def write_json(path, value, indent=2):
    """Writes `value` to `path` as JSON with `write_atomically`."""
    write_text(path, json.dumps(value, indent=indent) + "\n")


def read_json(path) -> dict:
    """The object in the JSON file `path`; a damaged one (an older capstf's write cut short, an
    edit) is a CapstfError that names it."""
    try:
        value = json.loads(Path(path).read_text())
    except ValueError as e:  # bad JSON, or bytes that are not UTF-8
        value, reason = None, str(e)
    else:
        reason = "not a JSON object"
    if not isinstance(value, dict):
        raise CapstfError(f"{path} is damaged ({reason}): restore it, or delete it and rerun the command that wrote it.")
    return value
