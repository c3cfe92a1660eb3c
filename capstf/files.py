"""JSON files that another process may read at any moment."""
import json
import os
from pathlib import Path


def write_json(path, value, indent=2):
    """Writes `value` to `path` so that a reader sees the old file or the new one, never a
    partial one: a worker reads config.json while the chief rewrites it at every start, and a
    rerun reads what a killed run was writing."""
    path = Path(path)
    scratch = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    scratch.write_text(json.dumps(value, indent=indent) + "\n")
    os.replace(scratch, path)  # atomic within one file system
