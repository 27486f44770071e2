"""PEM files of TLS, shared by the servers (server.py) and the channels (channels.py): read
once with an error naming the file, and a cheap signature telling when they changed."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from services.runtime.settings import SettingsError


def read_tls_file(path: str, what: str = "TLS file") -> bytes:
    """The file's bytes; SettingsError naming it (as `what`) when it cannot be read."""
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise SettingsError(f"cannot read {what} {path}: {error.strerror}") from None


def file_signature(paths: Iterable[str | Path]) -> tuple[object, ...]:
    """What tells that one of the files changed: inode, mtime and size of each (an errno
    for one that is missing). stat follows symlinks: a Secret volume swaps its ..data link."""
    signature: list[object] = []
    for path in paths:
        try:
            stat = Path(path).stat()
        except OSError as error:
            signature.append(error.errno)
        else:
            signature.append((stat.st_ino, stat.st_mtime_ns, stat.st_size))
    return tuple(signature)
