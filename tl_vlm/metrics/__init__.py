"""Moved to :mod:`tl_vlm.eval.metrics`; this path is kept for one release."""

from tl_vlm.eval.metrics import *  # noqa: F401,F403
from tl_vlm.eval.metrics import __all__  # noqa: F401
