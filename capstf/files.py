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
    run was writing. The file and then its folder are fsynced, so that after a power loss `path`
    is the old file or the whole new one, never an empty one. Scratch files that killed writers
    left behind are removed first. A missing folder is a CapstfError; a write that fails (a full
    disk, a read-only folder) is a RuntimeFailure that leaves the old file as it was and no
    scratch file."""
    path = Path(path)
    folder = path.resolve().parent
    if not folder.is_dir():
        raise CapstfError(f"Cannot write {path}: folder {folder} does not exist.")
    remove_stale_scratch(path)
    scratch = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(scratch)
        fsync(scratch)
        os.replace(scratch, path)  # atomic within one file system
        fsync(folder)  # the rename itself
    except OSError as e:
        scratch.unlink(missing_ok=True)
        raise RuntimeFailure(f"Cannot write {path} ({e.strerror or e}); what was there before is "
                             "unchanged: free space or fix the folder, then rerun.") from None


def fsync(path):
    """Flushes a file's or a folder's contents to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_stale_scratch(path):
    """Deletes the scratch files of `path` whose writer (the pid in their name) is gone: what a
    SIGKILL or a power loss during `write_atomically` leaves."""
    for scratch in path.parent.glob(f".{path.name}.*.tmp"):
        pid = scratch.name[len(path.name) + 2:-len(".tmp")]
        if pid.isdigit() and not process_exists(int(pid)):
            scratch.unlink(missing_ok=True)


def process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


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
