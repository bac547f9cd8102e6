"""cdface: the torch-free core every stage may import (config, manifest, atomic files, CLI root)."""

__version__ = "0.1.0"
