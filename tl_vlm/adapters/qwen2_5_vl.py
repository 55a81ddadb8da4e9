"""Qwen2.5-VL (``Qwen2_5_VLForConditionalGeneration``).

Same module paths and image layout as Qwen2-VL (see :mod:`tl_vlm.adapters.qwen2_vl`,
which defines the adapter and layout both families use): ``model.visual`` (windowed
ViT with a gated MLP and RMS norms, ``merger``), ``model.language_model`` (Qwen2
decoder, M-RoPE), ``lm_head``; ``<|vision_start|>`` + rows x cols ``<|image_pad|>`` +
``<|vision_end|>``, grid from ``image_grid_thw`` over ``spatial_merge_size``.

A separate family only because TL 4.3 ships ``Qwen2_5_VLArchitectureAdapter`` (which
requires torchvision); tl_vlm uses its own subclass, without that requirement.
"""

from __future__ import annotations

from tl_vlm.core.family import Family
from tl_vlm.adapters.qwen2_vl import QWEN2_5_VL, Qwen2VLAdapter, Qwen2VLLayout

FAMILY = Family(
    name="qwen2_5_vl",
    title="Qwen2.5-VL",
    image_tokens="`<|vision_start|>` + merged patches `<|image_pad|>` + `<|vision_end|>`",
    architectures=(QWEN2_5_VL,),
    adapter=Qwen2VLAdapter,
    layout=Qwen2VLLayout,
    example_ids=("Qwen/Qwen2.5-VL-3B-Instruct", "Qwen/Qwen2.5-VL-7B-Instruct"),
)
