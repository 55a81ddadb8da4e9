"""Qwen2.5-VL specifics (the shared layout is tested for both families in
test_positions_qwen2_vl.py): loading without torchvision, the windowed tower's hooks,
and exact positions for grids that span several 2x2 attention windows.

Tiny model: 4px patches merged 2x2, so an image (h x w) gives (h/8) x (w/8) tokens:
24x24 -> 3x3, 8x16 -> 1x2.
"""

import importlib.util

import pytest
import torch
from transformers import Qwen2_5_VLProcessor
from transformer_lens.model_bridge.supported_architectures.qwen2_5_vl import (
    Qwen2_5_VLArchitectureAdapter,
)

from tests.tiny import image
from tl_vlm.adapters import family_for_config
from tl_vlm.core.layout import LayoutError

NAME = "qwen2_5_vl"


def test_loads_without_torchvision(tiny_zoo):
    model = tiny_zoo.model(NAME)
    assert family_for_config(model.hf_model.config).name == NAME
    assert type(model.adapter).__name__ == "Qwen2VLAdapter"
    # TL's own adapter would refuse to load here; ours subclasses it without that need
    assert isinstance(model.adapter, Qwen2_5_VLArchitectureAdapter)
    assert Qwen2_5_VLArchitectureAdapter.required_libraries == ["torchvision"]
    assert importlib.util.find_spec("torchvision") is None
    assert model.adapter.required_libraries == []
    assert isinstance(model.processor, Qwen2_5_VLProcessor)
    with pytest.raises(ImportError, match="torchvision"):
        model.processor(text=["<|video_pad|> a"], videos=[[image(0, (16, 16))] * 2])


@torch.no_grad()
def test_windowed_tower_hooks(tiny_zoo):
    model = tiny_zoo.model(NAME)
    batch = model.prepare(["what is this"], images=[image(0, (24, 24))])
    _, cache = model.run_with_cache(batch)
    # 24x24 px -> 6x6 patches of 4px (36 rows), gated MLP (intermediate 64), merged to 9
    for i in range(2):
        assert cache[f"vision_encoder.blocks.{i}.hook_resid_post"].shape == (36, 32)
        assert cache[f"vision_encoder.blocks.{i}.mlp.gate.hook_out"].shape == (36, 64)
    assert cache["vision_projector.hook_out"].shape == (9, 32)
    # editing the tower reaches the logits
    def zero(x, hook):
        return torch.zeros_like(x)
    clean = model(batch)
    edited = model.run_with_hooks(batch, fwd_hooks=[("vision_encoder.blocks.1.hook_resid_post", zero)])
    assert (edited - clean).abs().max() > 1e-3


def test_positions_of_multi_window_grids(tiny_zoo):
    model = tiny_zoo.model(NAME)
    prompts = ["<|image_pad|> what <|image_pad|> is this", "a cat"]
    batch = model.prepare(prompts, images=[[image(0, (24, 24)), image(1, (8, 16))], None],
                          padding_side="left")
    assert batch.inputs["image_grid_thw"].tolist() == [[1, 6, 6], [1, 2, 4]]
    pos = batch.positions
    # row 0: BOI 0, 3x3 pads 1-9, EOI 10, "what" 11, BOI 12, 1x2 pads 13-14, EOI 15,
    # "is this" 16-17 (18 tokens); row 1 "a cat" left-padded to 16-17
    assert batch.input_ids.shape == (2, 18)
    assert pos.boi[0].tolist() == [0, 12]
    assert pos.image[0].tolist() == list(range(1, 10)) + [13, 14]
    assert pos.eoi[0].tolist() == [10, 15] and pos.gate[0].tolist() == [10, 15]
    assert pos.text[0].tolist() == [11, 16, 17]
    assert pos.grid[0].tolist() == (
        [[0, r, c] for r in range(3) for c in range(3)] + [[1, 0, 0], [1, 0, 1]])
    assert pos.padding[1].tolist() == list(range(16))
    assert pos.text[1].tolist() == [16, 17]
    assert pos.image_side[1].tolist() == [] and pos.grid[1].shape == (0, 3)
    assert pos.last.tolist() == [[17], [17]]
    # the 3x3 image claimed as 3x2: the grid disagrees with its 9 pads
    inputs = dict(batch.inputs)
    inputs["image_grid_thw"] = torch.tensor([[1, 6, 4], [1, 2, 4]])
    with pytest.raises(LayoutError, match="3x2"):
        model.layout.locate(inputs["input_ids"], inputs["attention_mask"], inputs)
