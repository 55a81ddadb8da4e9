"""Moved to :mod:`tl_vlm.eval.data`; this path is kept for one release."""

from tl_vlm.moved import become

become(__name__)
