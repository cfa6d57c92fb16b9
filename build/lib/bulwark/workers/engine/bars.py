"""tqdm bars that behave on any terminal (torch-free; the runner and the client share it)."""

from __future__ import annotations

import shutil
import sys
from typing import Any

from tqdm import tqdm


def bar(**kwargs: Any) -> tqdm:
    """A tqdm bar on stderr as wide as the terminal; 100 columns when the terminal reports no
    size or a size of 0 (some CI terminals and notebooks do)."""
    return tqdm(ncols=shutil.get_terminal_size((100, 24)).columns or 100, file=sys.stderr,
                **kwargs)
