"""Atomic file writes, torch-free (the sweep process imports them without loading torch).

The text goes to a temporary file of its own next to the target (``O_EXCL``: two writers
never share one), is fsynced and moved into place with ``os.replace``, so a reader or a crash
mid-write sees the previous file or the new one, never a part."""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Any

PRIVATE_UMASK = 0o077  # the service's processes: files 0600, folders 0700


def private_files() -> None:
    """From here on this process (and every process it starts) creates files 0600 and folders
    0700: the service's state (jobs, keys, weights, Redis' log) is no other user's to read."""
    os.umask(PRIVATE_UMASK)


def new_file(folder: Path, prefix: str, suffix: str) -> tuple[int, str]:
    """A new file of this writer's own in ``folder`` (O_EXCL), open for writing, with the mode
    the process's umask gives (``mkstemp`` would always make 0600, ``bulwark run``'s files
    included); (fd, path)."""
    while True:
        path = os.path.join(folder, f"{prefix}{secrets.token_hex(6)}{suffix}")
        try:
            return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), path
        except FileExistsError:
            continue


def atomic_write(path: Path, write) -> None:
    """``write(f)`` into a temporary binary file, then move it onto ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = new_file(path.parent, f".{path.name}.", ".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2))


def write_text(path: Path, text: str) -> None:
    atomic_write(Path(path), lambda f: f.write(text.encode()))
