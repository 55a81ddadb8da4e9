"""VLM families: one file each (adapter + image-token layout + prompt templates).

Every module here defines ``FAMILY``, a :class:`~tl_vlm.core.family.Family`; the
registry in :mod:`tl_vlm.core.family` finds them (CONTRIBUTING.md, "Adding a family").
The names below are re-exported from core, where the contract lives.
"""

from __future__ import annotations

from tl_vlm.core import hf_compat, registration
# The bridge every adapter uses for its text attention. Imported here, before any family
# module runs: it imports TransformerLens, whose start-up hook may ask for the families.
from tl_vlm.core.attention_bridge import (  # noqa: F401
    HookedAttentionBridge, default_attention_outside_text, use_hooked_attention)
from tl_vlm.core.family import (  # noqa: F401
    Family, SharedArchitectureAdapter, UnsupportedModelError, families, family_for_config,
    tl_adapter_classes)

hf_compat.apply()  # processors that need torchvision only for videos

READY = True  # TransformerLens' import (above) may have asked for the families too early:
registration.register_if_imported()  # then registration was deferred to this line
