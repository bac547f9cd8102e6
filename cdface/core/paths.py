"""Where cdface keeps machine-wide files: fetched assets, the local Triton's environment, tools.

``$CDFACE_CACHE`` or ``~/.cache/cdface``; each user of the cache takes one folder under it.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    return Path(os.environ.get("CDFACE_CACHE") or Path.home() / ".cache" / "cdface").expanduser()
