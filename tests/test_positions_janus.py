"""Janus image positions on sequences laid out by hand from ``JanusProcessor``.

The tokenizer adds ``<s>``; each ``<image_placeholder>`` of the prompt becomes
``<begin_of_image>``, 16 ``<image_placeholder>`` (tiny tower: 16px images, 4px patches,
a 4x4 grid) and ``<end_of_image>``. With ``use_default_system_prompt`` the processor
puts its system prompt between ``<s>`` and the prompt.
"""

from __future__ import annotations

import pytest
import torch

from tests.tiny import image
from tl_vlm import LayoutError

IMG, BOI, EOI = "<image_placeholder>", "<begin_of_image>", "<end_of_image>"
PROMPTS = ["what is this", f"{IMG} a cat {IMG} describe the image a dog"]
IMAGES = [image(0), [image(1), image(2, (30, 18))]]
GRID = [(r, c) for r in range(4) for c in range(4)]

TOKENS_0 = ["<s>", BOI] + [IMG] * 16 + [EOI] + "what is this".split()
TOKENS_1 = (["<s>", BOI] + [IMG] * 16 + [EOI, "a", "cat", BOI] + [IMG] * 16 + [EOI]
            + "describe the image a dog".split())

EXPECTED = {  # unpadded positions, from the token lists above
    0: dict(boi=[1], image=list(range(2, 18)), eoi=[18], gate=[18], row_breaks=[],
            specials=[], text=[0, 19, 20, 21], last=[21],
            grid=[(0, r, c) for r, c in GRID]),
    1: dict(boi=[1, 21], image=list(range(2, 18)) + list(range(22, 38)), eoi=[18, 38],
            gate=[18, 38], row_breaks=[], specials=[], text=[0, 19, 20, 39, 40, 41, 42, 43],
            last=[43], grid=[(i, r, c) for i in range(2) for r, c in GRID]),
}


def _check(pos, b, offset):
    exp = EXPECTED[b]
    for name in ("boi", "image", "eoi", "gate", "row_breaks", "specials", "text", "last"):
        assert getattr(pos, name)[b].tolist() == [p + offset for p in exp[name]], name
    assert [tuple(r) for r in pos.grid[b].tolist()] == exp["grid"]


def test_token_sequences_are_the_hand_built_ones(tiny_zoo):
    model = tiny_zoo.model("janus")
    batch = model.prepare(PROMPTS, images=IMAGES, padding_side="right")
    tok = model.processor.tokenizer
    assert (len(TOKENS_0), len(TOKENS_1)) == (22, 44)
    assert batch.input_ids[0, :22].tolist() == tok.convert_tokens_to_ids(TOKENS_0)
    assert batch.input_ids[1].tolist() == tok.convert_tokens_to_ids(TOKENS_1)
    assert tuple(batch.inputs["pixel_values"].shape) == (3, 3, 16, 16)


def test_right_padding(tiny_zoo):
    # JanusProcessor's own default is left padding: prepare's choice must win.
    batch = tiny_zoo.model("janus").prepare(PROMPTS, images=IMAGES, padding_side="right")
    pos = batch.positions
    assert batch.padding_side == "right" and batch.input_ids.shape == (2, 44)
    _check(pos, 0, 0)
    _check(pos, 1, 0)
    assert pos.padding[0].tolist() == list(range(22, 44))
    assert pos.after_image[1].tolist() == [39, 40, 41, 42, 43]
    assert pos.last_image[1].tolist() == [17, 37]


def test_processor_follows_the_requested_padding_side(tiny_zoo):
    """JanusProcessor pads left unless the tokenizer was created with a padding side."""
    from transformers import JanusProcessor

    model = tiny_zoo.model("janus")
    processor = JanusProcessor.from_pretrained(str(tiny_zoo.path("janus")))
    assert "padding_side" not in processor.tokenizer.init_kwargs
    processor.tokenizer.padding_side = "right"
    mask = processor(text=["a", "a cat"], padding=True, return_tensors="pt")["attention_mask"]
    assert mask[0].tolist() == [0, 1, 1]  # the processor's own default wins
    type(model.layout)(processor, model.hf_model.config)
    mask = processor(text=["a", "a cat"], padding=True, return_tensors="pt")["attention_mask"]
    assert mask[0].tolist() == [1, 1, 0]


def test_left_padding(tiny_zoo):
    batch = tiny_zoo.model("janus").prepare(PROMPTS, images=IMAGES, padding_side="left")
    pos = batch.positions
    assert batch.padding_side == "left"
    _check(pos, 0, 44 - 22)
    _check(pos, 1, 0)
    assert pos.padding[0].tolist() == list(range(0, 22))


def test_default_system_prompt_shifts_positions(tiny_zoo):
    from transformers import JanusProcessor
    from transformers.models.janus.processing_janus import DEFAULT_SYSTEM_PROMPT

    model = tiny_zoo.model("janus")
    processor = JanusProcessor.from_pretrained(str(tiny_zoo.path("janus")),
                                               use_default_system_prompt=True)
    layout = type(model.layout)(processor, model.hf_model.config)
    text = layout.with_placeholders(PROMPTS[0], 1)
    inputs = dict(processor(text=[text], images=[image(0)], return_tensors="pt"))
    pos = layout.locate(inputs["input_ids"], inputs["attention_mask"], inputs)
    n_system = len(DEFAULT_SYSTEM_PROMPT.split())  # word-level tokenizer: one token per word
    assert inputs["input_ids"].shape[1] == 22 + n_system
    exp = EXPECTED[0]
    assert pos.boi[0].tolist() == [1 + n_system]
    assert pos.image[0].tolist() == [p + n_system for p in exp["image"]]
    assert pos.eoi[0].tolist() == pos.gate[0].tolist() == [18 + n_system]
    assert pos.text[0].tolist() == list(range(0, 1 + n_system)) + [p + n_system for p in (19, 20, 21)]


def test_not_native_but_eoi_is_the_gate(tiny_zoo):
    layout = tiny_zoo.model("janus").layout
    assert not layout.native and layout.gate_description == "none (non-native)"


def test_placeholder_count_mismatch_raises(tiny_zoo):
    model = tiny_zoo.model("janus")
    with pytest.raises(LayoutError, match="placeholder"):
        model.prepare([f"{IMG} one {IMG} two"], images=[[image(0)]])


def test_tampered_metadata_raises(tiny_zoo):
    model = tiny_zoo.model("janus")
    batch = model.prepare(PROMPTS, images=IMAGES)
    inputs = dict(batch.inputs)
    inputs["pixel_values"] = batch.inputs["pixel_values"][:2]  # one image fewer than the ids
    with pytest.raises(LayoutError, match="more images"):
        model.layout.locate(batch.input_ids, batch.attention_mask, inputs)
    inputs["pixel_values"] = torch.cat([batch.inputs["pixel_values"]] * 2)  # too many
    with pytest.raises(LayoutError, match="describes 6 images"):
        model.layout.locate(batch.input_ids, batch.attention_mask, inputs)


def test_truncated_ids_raise(tiny_zoo):
    model = tiny_zoo.model("janus")
    batch = model.prepare(PROMPTS[:1], images=IMAGES[:1])
    ids = batch.input_ids[:, :10]  # cut inside the image: EOI missing, 8 tokens for a 4x4 grid
    with pytest.raises(LayoutError):
        model.layout.locate(ids, batch.attention_mask[:, :10], batch.inputs)
    ids = torch.cat([batch.input_ids[:, :5], batch.input_ids[:, 6:]], dim=1)  # one token dropped
    with pytest.raises(LayoutError, match="4x4"):
        model.layout.locate(ids, batch.attention_mask[:, 1:], batch.inputs)


def test_processor_and_tower_that_disagree_raise(tiny_zoo):
    from transformers import JanusProcessor

    model = tiny_zoo.model("janus")
    processor = JanusProcessor.from_pretrained(str(tiny_zoo.path("janus")), num_image_tokens=25)
    with pytest.raises(LayoutError, match="num_image_tokens"):
        type(model.layout)(processor, model.hf_model.config)
