"""Moved to :mod:`tl_vlm.eval.metrics.cider`; this path is kept for one release."""

from tl_vlm.moved import become

become(__name__)
