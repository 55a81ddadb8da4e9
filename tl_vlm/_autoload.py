"""Moved to :mod:`tl_vlm.core.autoload`; kept for the ``.pth`` file of an earlier install."""

from tl_vlm.core.autoload import install  # noqa: F401
