"""The ``tl-vlm`` command line: one module per command."""

from tl_vlm.cli.commands import main

__all__ = ["main"]
