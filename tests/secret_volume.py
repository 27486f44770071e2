"""A directory laid out as the kubelet lays out a mounted Secret, and updated as it updates one.

Each key is a symlink `<key> -> ..data/<key>`; `..data` links to a timestamped directory
holding the files. An update writes a new timestamped directory and renames a new `..data`
link over the old one: one atomic step, seen by a directory watch as a move into it (what
Envoy's SDS `watched_directory` waits for).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from pathlib import Path

DATA = "..data"


class SecretVolume:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self._generation = 0

    def path(self, key: str) -> Path:
        return self.directory / key

    def write(self, files: Mapping[str, Path]) -> None:
        """Publish `files` (key -> source file) as the Secret's new content, atomically."""
        self._generation += 1
        version = f"..{self._generation:04d}"
        target = self.directory / version
        target.mkdir()
        for key, source in files.items():
            shutil.copyfile(source, target / key)
        previous = (self.directory / DATA).resolve() if (self.directory / DATA).is_symlink() else None
        staging = self.directory / "..data_tmp"
        os.symlink(version, staging)
        os.replace(staging, self.directory / DATA)
        for key in files:
            link = self.directory / key
            if not link.is_symlink():
                os.symlink(f"{DATA}/{key}", link)
        if previous is not None:
            shutil.rmtree(previous)
