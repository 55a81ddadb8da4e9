"""Moved to :mod:`tl_vlm.study.gate_figures`; this path is kept for one release."""

from tl_vlm.moved import become

become(__name__)
