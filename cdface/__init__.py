"""cdface: train, export, serve and deploy face-recognition models.

One namespace. ``cdface.core`` is the torch-free core every stage imports (contract constants,
manifest, the image decoder, alignment, assets, cache paths); the stages are ``cdface.training``,
``cdface.export`` and ``cdface.serving`` (each a top-level folder of the repository);
``cdface.cli`` is the command-line root above them, and ``cdface.devtools`` holds development and
demo tooling (a local Triton, the demos). Import rules: ``[tool.importlinter]`` in pyproject.toml.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    # pyproject.toml is the one place the version is written; the installed metadata carries it.
    __version__ = version("cdface")
except PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"
