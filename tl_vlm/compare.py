"""Moved to :mod:`tl_vlm.study.compare`; this path is kept for one release."""

from tl_vlm.moved import become

become(__name__)
