"""Qwen3-VL-MoE (``Qwen3VLMoeForConditionalGeneration``: Qwen3-VL-30B-A3B, -235B-A22B).

HF classes (``transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe``): the module
paths, vision tower (with DeepStack mergers), processor and image layout of Qwen3-VL
(see :mod:`tl_vlm.adapters.qwen3_vl`, whose adapter, DeepStack handling and layout this
family reuses); only the decoder's MLP differs: ``mlp`` is a
``Qwen3VLMoeTextSparseMoeBlock`` (``gate``: a top-k router over ``num_experts``,
``experts``: the experts' weights as 3-D tensors) on every layer but those listed in
``mlp_only_layers`` (a dense ``gate_proj``/``up_proj``/``down_proj`` MLP). TL 4.3's
``Qwen3VLMoeArchitectureAdapter`` maps that MLP (``MoEBridge``: ``blocks.{i}.mlp``
hooks its input and output, ``blocks.{i}.mlp.gate`` the router); the adapter here takes
it and adds what :class:`~tl_vlm.adapters.qwen3_vl.Qwen3VLAdapter` adds (hooked text
attention with q/k norm hooks, no torchvision requirement, DeepStack inside the blocks:
``blocks.{k}.deepstack``).

Image-side tokens, from token ids: ``<|vision_start|>`` (BOI), ``rows x cols``
``<|image_pad|>`` (grid ``(t * h // m) x (w // m)`` from ``image_grid_thw``, ``m =
spatial_merge_size``), ``<|vision_end|>`` (EOI). Not a native multimodal model: no gate
in the Narrow Gate sense; EOI is recorded as ``gate`` for the knockout presets, and
``find_gates`` is the tool to look for one.
"""

from __future__ import annotations

from transformer_lens.model_bridge.supported_architectures.qwen3_vl_moe import (
    Qwen3VLMoeArchitectureAdapter,
)

from tl_vlm.adapters.qwen3_vl import Qwen3VLAdapter, Qwen3VLLayout
from tl_vlm.core.family import Family

QWEN3_VL_MOE = "Qwen3VLMoeForConditionalGeneration"


class Qwen3VLMoeAdapter(Qwen3VLAdapter, Qwen3VLMoeArchitectureAdapter):
    """Qwen3-VL's adapter with TL's sparse-MoE MLP mapping (``_build_mlp_bridge`` of
    ``Qwen3VLMoeArchitectureAdapter``, reached through the method order)."""


FAMILY = Family(
    name="qwen3_vl_moe",
    title="Qwen3-VL-MoE",
    image_tokens="`<|vision_start|>` + merged patches `<|image_pad|>` + `<|vision_end|>` "
                 "(+ DeepStack features added at the image positions in the first layers)",
    architectures=(QWEN3_VL_MOE,),
    adapter=Qwen3VLMoeAdapter,
    layout=Qwen3VLLayout,
    example_ids=("Qwen/Qwen3-VL-30B-A3B-Instruct", "Qwen/Qwen3-VL-235B-A22B-Instruct"),
)
