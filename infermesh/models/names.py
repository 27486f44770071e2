"""What the model tools accept as a model name and a version: argparse types.

A model is a directory of the repository, so its name must be one plain path component:
`../x`, `a/b` or an empty name would write outside the model's own directory.
"""

from __future__ import annotations

import argparse
import re

from infermesh.cli_help import whole_number

# Letters, digits, '_', '-' and '.', starting with a letter or digit (so never '.' or '..').
_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_VERSION = whole_number(1)  # Triton's versions: 1, 2, ...


def model_name(text: str) -> str:
    if not _MODEL_NAME.fullmatch(text):
        shown = text if len(text) <= 40 else text[:40] + "..."
        raise argparse.ArgumentTypeError(
            f"{shown!r} is not a model name: 1-128 letters, digits, '_', '-' or '.', starting with a letter or digit"
        )
    return text


def model_version(text: str) -> int:
    try:
        return _VERSION(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"{text[:40]!r} is not a model version: a whole number from 1") from None
