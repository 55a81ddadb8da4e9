"""Work-arounds for transformers 5 processors on machines without torchvision.

tl_vlm needs only the PIL image processors, but some processor classes cannot even
be built or loaded without torchvision:

- ``Qwen2VLProcessor``, ``Qwen2_5_VLProcessor``, ``LlavaOnevisionProcessor``,
  ``Qwen3VLProcessor``, ``Glm4vProcessor``, ``InternVLProcessor`` and
  ``SmolVLMProcessor`` always
  take a video processor, and every video processor needs torchvision. They are made
  image-only: ``ProcessorMixin`` reads its sub-processors from ``get_attributes()``,
  so dropping ``video_processor`` there is enough for ``__init__``,
  ``from_pretrained`` and ``save_pretrained``; a video input raises a clear error.
- ``SmolVLMProcessor`` also takes its video processor as a required argument and refuses
  to be built without ``num2words`` (which it uses only to write video frame times): its
  video processor defaults to None and a stand-in ``num2words`` raises if ever called.
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

    for name in ("Qwen2VLProcessor", "Qwen2_5_VLProcessor", "LlavaOnevisionProcessor",
                 "Qwen3VLProcessor", "Glm4vProcessor", "InternVLProcessor",
                 "SmolVLMProcessor"):
        proc = getattr(transformers, name)
        proc.get_attributes = classmethod(_image_only_attributes)
        proc.video_processor = _NoVideoProcessor()


def _num2words_for_videos(*args: Any, **kwargs: Any) -> str:
    raise ImportError("SmolVLM video prompts need `num2words` (pip install num2words)")


def make_smolvlm_processor_image_only() -> None:
    """Let ``SmolVLMProcessor`` be built without a video processor and without num2words."""
    from transformers.models.smolvlm import processing_smolvlm as module

    if getattr(module, "num2words", None) is None:
        module.num2words = _num2words_for_videos
    # video_processor is a required positional argument: give it the default None (the
    # signature itself must stay, from_pretrained/save_pretrained read it).
    init = module.SmolVLMProcessor.__init__
    params = init.__code__.co_varnames[1:init.__code__.co_argcount]
    defaults = init.__defaults__ or ()
    if "video_processor" in params and \
            len(defaults) == len(params) - params.index("video_processor") - 1:
        init.__defaults__ = (None, *defaults)


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
    make_smolvlm_processor_image_only()
    _applied = True
    return True
