"""VLM families: one module each, registered here.

Each family module defines a :class:`Family`: the HF architecture names it covers,
its TransformerLens adapter (a subclass of TL's own where TL has one) and its
:class:`~tl_vlm.layout.ImageLayout`.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Any, Optional

from tl_vlm import _hf_compat
from tl_vlm.layout import ImageLayout

_hf_compat.apply()  # processors that need torchvision only for videos



@dataclass(frozen=True)
class Family:
    """One VLM family as tl_vlm supports it.

    Attributes:
        name: short name used in docs and errors ("chameleon").
        architectures: HF ``config.architectures`` names this family covers.
        adapter: the TransformerLens ``ArchitectureAdapter`` subclass to use.
        layout: the image-token layout class.
        example_ids: hub ids, for docs and error messages.
        tl_has_adapter: whether TransformerLens 4.3 ships an adapter for these names
            (then tl_vlm's adapter is used by HookedVLM only, not injected into TL).
        matches: optional predicate on the HF config, for architectures shared by two
            families (a Llava checkpoint with a Pixtral tower is the pixtral family).
        final_logits: what the HF forward does to ``lm_head``'s output, as
            ``model -> (logits -> logits)``; None when it returns it unchanged. The logit
            lens applies it so that lensing the last residual gives the model's logits.
    """

    name: str
    architectures: tuple[str, ...]
    adapter: type
    layout: type[ImageLayout]
    example_ids: tuple[str, ...] = ()
    tl_has_adapter: bool = True
    matches: Optional[Any] = field(default=None, compare=False)
    final_logits: Optional[Any] = field(default=None, compare=False)


_FAMILIES: Optional[list[Family]] = None


def families() -> list[Family]:
    """All supported families (imports the family modules on first use)."""
    global _FAMILIES
    if _FAMILIES is None:
        names = sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))
        loaded = []
        for m in names:
            try:
                loaded.append(importlib.import_module(f"{__name__}.{m}").FAMILY)
            except Exception as err:  # name the broken family instead of a bare ImportError
                raise RuntimeError(f"tl_vlm family module {m!r} failed to load: {err!r}") from err
        _FAMILIES = loaded
    return _FAMILIES


class UnsupportedModelError(ValueError):
    """The checkpoint's architecture is not one tl_vlm supports."""


def family_for_config(hf_config: Any) -> Family:
    """The family of an HF config, or a clear error listing the supported ones."""
    archs = list(getattr(hf_config, "architectures", None) or [])
    candidates = [f for f in families() if set(archs) & set(f.architectures)]
    specific = [f for f in candidates if f.matches is not None and f.matches(hf_config)]
    generic = [f for f in candidates if f.matches is None]
    if specific or generic:
        return (specific or generic)[0]
    table = "\n".join(
        f"  {f.name:16s} {', '.join(f.architectures)}" for f in families()
    )
    raise UnsupportedModelError(
        f"tl_vlm does not support architecture {archs or '(none in config)'} "
        f"(model_type={getattr(hf_config, 'model_type', None)!r}). Supported families:\n"
        f"{table}\nVILA-U is not in transformers; see the README for what to use instead."
    )
