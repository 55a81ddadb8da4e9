"""The package version (one place; ``tl_vlm.__version__`` re-exports it)."""

__version__ = "0.1.0"
