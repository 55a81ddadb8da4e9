"""Moved to :mod:`tl_vlm.eval.metrics.vqa`; this path is kept for one release."""

from tl_vlm.moved import become

become(__name__)
