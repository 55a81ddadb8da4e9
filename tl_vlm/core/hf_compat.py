"""Work-arounds for transformers 5 processors on machines without torchvision.

tl_vlm needs only the PIL image processors, but some processor classes cannot even
be built or loaded without torchvision:

- ``Qwen2VLProcessor``, ``Qwen2_5_VLProcessor`` and ``LlavaOnevisionProcessor`` always
  take a video processor, and every video processor needs torchvision. They are made
  image-only: ``ProcessorMixin`` reads its sub-processors from ``get_attributes()``,
  so dropping ``video_processor`` there is enough for ``__init__``,
  ``from_pretrained`` and ``save_pretrained``; a video input raises a clear error.
- ``PixtralProcessor``'s module imports one helper from the torchvision image
  processor; the PIL image-processor module has the same function, so a stand-in
  module provides it.

Nothing changes where torchvision is installed. Applied once, when
``tl_vlm.adapters`` is imported (by HookedVLM or by TL booting a tl_vlm adapter).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from typing import Any

_applied = False


class _NoVideoProcessor:
    """Stands in for a video processor: videos need torchvision, which is missing."""

    valid_kwargs = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise ImportError(
            "video inputs need transformers' video processor, which needs torchvision "
            "(not installed); tl_vlm handles images only without it"
        )


def _image_only_attributes(cls: type) -> list[str]:
    return ["image_processor", "tokenizer"]


def allow_image_only_processors() -> None:
    """Let the processors that insist on a video processor work with images only."""
    import transformers

    for name in ("Qwen2VLProcessor", "Qwen2_5_VLProcessor", "LlavaOnevisionProcessor"):
        proc = getattr(transformers, name)
        proc.get_attributes = classmethod(_image_only_attributes)
        proc.video_processor = _NoVideoProcessor()


def make_pixtral_processor_loadable() -> None:
    """Give ``processing_pixtral`` its one torchvision-module helper from the PIL module."""
    import transformers.models.pixtral as pixtral_pkg
    from transformers.models.pixtral import image_processing_pil_pixtral as pil

    name = "transformers.models.pixtral.image_processing_pixtral"
    if name not in sys.modules:
        stub = types.ModuleType(name)
        stub.get_resize_output_image_size = pil.get_resize_output_image_size
        sys.modules[name] = stub
    module = importlib.import_module("transformers.models.pixtral.processing_pixtral")
    # The lazy package would otherwise keep handing out its placeholder class.
    pixtral_pkg.PixtralProcessor = module.PixtralProcessor


def apply() -> bool:
    """Apply the work-arounds when torchvision is missing; returns whether it did."""
    global _applied
    if _applied or importlib.util.find_spec("torchvision") is not None:
        return _applied
    allow_image_only_processors()
    make_pixtral_processor_loadable()
    _applied = True
    return True
