"""VLM families: one module each, registered here.

Each family module defines a :class:`Family`: the HF architecture names it covers,
its TransformerLens adapter (a subclass of TL's own where TL has one) and its
:class:`~tl_vlm.core.layout.ImageLayout`.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Any, Optional

from transformer_lens.model_bridge.architecture_adapter import ArchitectureAdapter

from tl_vlm import _autoload
from tl_vlm.core import hf_compat
from tl_vlm.core.layout import ImageLayout

hf_compat.apply()  # processors that need torchvision only for videos



@dataclass(frozen=True)
class Family:
    """One VLM family as tl_vlm supports it.

    Attributes:
        name: short name used in docs and errors ("chameleon").
        architectures: HF ``config.architectures`` names this family covers.
        adapter: the TransformerLens ``ArchitectureAdapter`` subclass to use.
        layout: the image-token layout class.
        example_ids: hub ids, for docs and error messages.
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
    matches: Optional[Any] = field(default=None, compare=False)
    final_logits: Optional[Any] = field(default=None, compare=False)


_READY = False
_FAMILIES: Optional[list[Family]] = None
_LOADING = False


def families() -> list[Family]:
    """All supported families (imports the family modules on first use).

    Once loaded, they are registered with TransformerLens if it is imported already
    (else :mod:`tl_vlm._autoload` registers them when it is).
    """
    global _FAMILIES, _LOADING
    if _FAMILIES is None:
        names = sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))
        loaded = []
        _LOADING = True
        try:
            for m in names:
                try:
                    loaded.append(importlib.import_module(f"{__name__}.{m}").FAMILY)
                except Exception as err:  # name the broken family instead of a bare ImportError
                    raise RuntimeError(f"tl_vlm family module {m!r} failed to load: {err!r}") from err
        finally:
            _LOADING = False
        _FAMILIES = loaded
        _autoload.register_if_imported()
    return _FAMILIES


def _ready() -> bool:
    """Whether the families can be listed now (not while this package or a family
    module is still being imported)."""
    return _READY and not _LOADING


def tl_adapter_classes() -> dict[str, type]:
    """Architecture name -> the adapter class TransformerLens should use for it.

    One family's adapter where the architecture is that family's alone,
    :class:`SharedArchitectureAdapter` where families share it (a
    ``LlavaForConditionalGeneration`` is LLaVA or Pixtral, by its vision tower).

    Example:
        >>> classes = tl_adapter_classes()
        >>> classes["ChameleonForConditionalGeneration"].__name__
        'ChameleonAdapter'
        >>> classes["LlavaForConditionalGeneration"] is SharedArchitectureAdapter
        True
    """
    owners: dict[str, list[Family]] = {}
    for fam in families():
        for arch in fam.architectures:
            owners.setdefault(arch, []).append(fam)
    out = {}
    for arch, fams in owners.items():
        adapters = {f.adapter for f in fams}
        out[arch] = fams[0].adapter if len(adapters) == 1 else SharedArchitectureAdapter
    return out


class SharedArchitectureAdapter(ArchitectureAdapter):
    """The adapter TransformerLens gets for an architecture several families share.

    ``SharedArchitectureAdapter(cfg)`` builds the adapter of the family the config
    belongs to (:func:`family_for_config`): a ``LlavaForConditionalGeneration`` with a
    Pixtral tower gets :class:`~tl_vlm.adapters.pixtral.PixtralAdapter`, one with a CLIP
    tower :class:`~tl_vlm.adapters.llava.LlavaAdapter`.
    """

    def __new__(cls, cfg: Any) -> ArchitectureAdapter:  # type: ignore[misc]
        return family_for_config(cfg).adapter(cfg)


class UnsupportedModelError(ValueError):
    """The checkpoint's architecture is not one tl_vlm supports."""


def family_for_config(hf_config: Any) -> Family:
    """The family of an HF config, or a clear error listing the supported ones."""
    # An HF config lists ``architectures``; TransformerLens' bridge config has one ``architecture``.
    archs = list(getattr(hf_config, "architectures", None)
                 or [a for a in [getattr(hf_config, "architecture", None)] if a])
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


# The bridge every adapter uses for its text attention (public here; its module is
# private so that families() does not take it for a family module).
from tl_vlm.core.attention_bridge import (  # noqa: E402,F401
    HookedAttentionBridge, default_attention_outside_text, use_hooked_attention)

_READY = True  # TL's import (triggered above) may have called back before this line:
_autoload.register_if_imported()  # then it deferred, and registering happens now
