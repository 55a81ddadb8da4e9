"""SmolVLM2 (``SmolVLMForConditionalGeneration``: SmolVLM2-256M/500M/2.2B).

Same module paths and image layout as Idefics3 (see :mod:`tl_vlm.adapters.idefics3`,
which defines the adapter and the split-image layout both families use):
``model.vision_model`` (SigLIP-like tower), ``model.connector`` (pixel shuffle +
projection), ``model.text_model`` (SmolLM2, Llama-shaped), ``lm_head``. Each ``<image>``
becomes its crops, each ``<fake_token_around_image><row_r_col_c>`` + ``image_seq_len`` x
``<image>`` with ``"\\n"`` after each crop row, then ``"\\n<fake_token_around_image>
<global-img>"`` + ``image_seq_len`` x ``<image>`` + ``<fake_token_around_image>``. BOI is
an image's first ``<fake_token_around_image>``, EOI (and the gate candidate) its closing
one after the global view; the other wrappers, ``<row_r_col_c>`` and ``<global-img>``
are ``specials``, the ``"\\n"`` text ``row_breaks``.

Differences from Idefics3 that matter here: ``SmolVLMProcessor`` names the global tag
``global_image_token`` (read from the tokenizer), it marks only the ``<image>`` tokens
in ``mm_token_type_ids``, and it takes images nested per prompt. Without torchvision
(and without ``num2words``, which it needs for video prompts only) it is made image-only
by :mod:`tl_vlm.core.hf_compat`. TL 4.3 has no SmolVLM adapter; the Idefics3 one fits.
"""

from __future__ import annotations

from tl_vlm.core.family import Family
from tl_vlm.adapters.idefics3 import Idefics3Adapter, SplitImageLayout

SMOLVLM = "SmolVLMForConditionalGeneration"


class SmolVLMLayout(SplitImageLayout):
    """The Idefics3 layout as ``SmolVLMProcessor`` writes and marks it."""

    processor_counted = ("image",)   # mm_token_type_ids marks the <image> tokens only
    processor_tokens = {"placeholder": "image_token", "content_token": "image_token",
                        "boi_token": "fake_image_token", "eoi_token": "fake_image_token",
                        "global_token": "global_image_token"}


FAMILY = Family(
    name="smolvlm",
    title="SmolVLM2",
    image_tokens=("per crop `<fake_token_around_image>` `<row_r_col_c>` + 64 or 81 x "
                  "`<image>`, `\\n` after each crop row; `\\n<fake_token_around_image>"
                  "<global-img>` + the same + `<fake_token_around_image>`"),
    architectures=(SMOLVLM,),
    adapter=Idefics3Adapter,
    layout=SmolVLMLayout,
    example_ids=("HuggingFaceTB/SmolVLM2-2.2B-Instruct",
                 "HuggingFaceTB/SmolVLM2-256M-Video-Instruct"),
)
