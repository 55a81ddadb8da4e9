"""tl_vlm.plot: image tokens placed on the picture, per layout kind, against hand-computed
geometry; the figures draw what they are given (values, titled colour bars, tight axes).

Pictures are blank arrays of chosen sizes: only their size matters for the placement.
The tiny checkpoints' processors (tests/tiny) are scaled-down copies of the released ones
(Chameleon and CLIP: shortest edge then a centre crop; Janus: a padded square; Qwen2-VL,
Pixtral, Emu3 and Gemma 3: the whole picture; LLaVA-OneVision: base grid + tile map).
"""

from __future__ import annotations

import doctest

import numpy as np
import pytest
import torch

from tl_vlm.core import layout as layout_module
from tl_vlm import plot
from tl_vlm.core.layout import LayoutError


def picture(height: int, width: int) -> np.ndarray:
    return np.zeros((height, width, 3), dtype=np.uint8)


def grid_boxes(box, rows: int, cols: int) -> torch.Tensor:
    """Row-major boxes of a rows x cols grid of equal cells over ``box``."""
    left, top, right, bottom = box
    h, w = (bottom - top) / rows, (right - left) / cols
    return torch.tensor([[left + c * w, top + r * h, left + (c + 1) * w, top + (r + 1) * h]
                         for r in range(rows) for c in range(cols)], dtype=torch.float64)


def boxes_of(tiny_zoo, family: str, pic, prompt="what is this"):
    model = tiny_zoo.model(family)
    batch = model.prepare([prompt], images=[pic])
    return model, batch, plot.token_boxes(model, batch, 0, pic)


# -- one test per layout kind: where each token lies on the picture ---------------------------
@pytest.mark.parametrize("name", ["chameleon", "llava"])
def test_centre_crop_layouts(tiny_zoo, name):
    # A 40x24 (w x h) picture: the shortest edge (24) is scaled to 16, so the width to
    # 26.67; the 16x16 centre crop is 24 picture pixels wide, starting at (40 - 24) / 2 = 8.
    # The 4x4 grid (VQ codes / CLIP patches) covers that square, 6 px per token.
    model, batch, boxes = boxes_of(tiny_zoo, name, picture(24, 40))
    assert torch.allclose(boxes, grid_boxes((8, 0, 32, 24), 4, 4))


def test_janus_pads_to_a_square(tiny_zoo):
    # Janus scales the longest edge and pads to a centred square: a 40x24 picture sits in
    # a 40x40 square from y = -8 to 32; 4x4 tokens of 10x10 px, the top and bottom rows
    # partly over the padding.
    _, _, boxes = boxes_of(tiny_zoo, "janus", picture(24, 40))
    assert torch.allclose(boxes, grid_boxes((0, -8, 40, 32), 4, 4))


def test_qwen2_vl_merged_patches_cover_the_picture(tiny_zoo):
    # 4 px patches merged 2x2: one token per 8x8 px. A 24x16 picture is a 2x3 token grid.
    _, batch, boxes = boxes_of(tiny_zoo, "qwen2_vl", picture(16, 24))
    assert batch.positions.grid[0][:, 1:].max(0).values.tolist() == [1, 2]
    assert torch.allclose(boxes, grid_boxes((0, 0, 24, 16), 2, 3))
    # smart_resize rounds a 36x20 picture to 32x16 px (2x4 tokens, under max_pixels=576);
    # the tokens still cover all of it
    _, batch, boxes = boxes_of(tiny_zoo, "qwen2_vl", picture(20, 36))
    rows, cols = (batch.positions.grid[0][:, 1:].max(0).values + 1).tolist()
    assert (rows, cols) == (2, 4)
    assert torch.allclose(boxes, grid_boxes((0, 0, 36, 20), 2, 4))


def test_pixtral_rows_skip_the_breaks(tiny_zoo):
    # 4 px patches, longest edge 16: a 12x16 (w x h) picture is 4 rows of 3 [IMG] tokens,
    # each row ended by [IMG_BREAK] (the last by [IMG_END]); breaks are not placed.
    model, batch, boxes = boxes_of(tiny_zoo, "pixtral", picture(16, 12))
    pos = batch.positions
    assert len(pos.image[0]) == 12 and len(pos.row_breaks[0]) == 3
    assert torch.allclose(boxes, grid_boxes((0, 0, 12, 16), 4, 3))


def test_emu3_vq_grid_covers_the_picture(tiny_zoo):
    # Emu3 resizes a 24x20 picture to 24x16 px, a 2x3 VQ grid (8 px per code) over the
    # whole picture: codes of 8 x 10 picture px. EOL slots are row breaks, not placed.
    _, batch, boxes = boxes_of(tiny_zoo, "emu3", picture(20, 24))
    assert len(batch.positions.image[0]) == 6
    assert torch.allclose(boxes, grid_boxes((0, 0, 24, 20), 2, 3))


def test_gemma3_pooled_grid_covers_the_picture(tiny_zoo):
    _, _, boxes = boxes_of(tiny_zoo, "gemma3", picture(30, 18))
    assert torch.allclose(boxes, grid_boxes((0, 0, 18, 30), 2, 2))


def test_onevision_base_and_tiles_placed_on_the_picture(tiny_zoo):
    # Tiny OneVision: 16 px tiles of 4x4 features, pinpoints (h, w) 16x16, 16x32, 32x16.
    # A 40x24 (w x h) picture: best resolution 16x32 (scale 2/3 keeps the most pixels);
    # resized to 16x27 (ceil(40 * 16/24)) and pasted at x = (32 - 27) // 2 = 2; the tile
    # feature map is 4x8 and the model drops (8 - int(40 * 4/24)) // 2 = 1 column on each
    # side: 4x6 features, i.e. canvas x from 4 to 28 px, picture x from (4 - 2) * 40/27
    # to (28 - 2) * 40/27. The base grid (4x4) is the whole picture resized.
    model, batch, boxes = boxes_of(tiny_zoo, "llava_onevision", picture(24, 40))
    placed = plot.place_tokens(model, batch, 0, picture(24, 40))
    assert [(p.view.name, p.view.first_row, p.view.rows, p.view.cols) for p in placed] == \
        [("base", 0, 4, 4), ("tiles", 4, 4, 6)]
    tiles = (2 * 40 / 27, 0, 26 * 40 / 27, 24)
    expected = torch.cat([grid_boxes((0, 0, 40, 24), 4, 4), grid_boxes(tiles, 4, 6)])
    assert torch.allclose(boxes, expected)
    # every token placed once: base tokens then tile tokens, in sequence order
    assert torch.equal(torch.cat([p.tokens[p.tokens >= 0] for p in placed]), torch.arange(40))


def test_onevision_tiles_of_an_exact_fit(tiny_zoo):
    # A 32x16 picture is exactly the 16x32 pinpoint: 4x8 tile features of 4x4 px, no
    # padding dropped; the base's 4x4 tokens are 8x4 px.
    _, _, boxes = boxes_of(tiny_zoo, "llava_onevision", picture(16, 32))
    assert torch.allclose(boxes, torch.cat([grid_boxes((0, 0, 32, 16), 4, 4),
                                            grid_boxes((0, 0, 32, 16), 4, 8)]))


def test_onevision_multi_image_bases_are_padded_squares(tiny_zoo):
    # In a prompt with two images each is only its base grid, of the picture padded to a
    # centred square: an 18x30 (w x h) picture sits in a 30x30 square from x = -6.
    model = tiny_zoo.model("llava_onevision")
    pics = [picture(16, 16), picture(30, 18)]
    batch = model.prepare(["<image> a cat <image> a dog"], images=[pics])
    placed = plot.place_tokens(model, batch, 0, pics)
    assert [(p.image, p.view.name, p.view.box) for p in placed] == \
        [(0, "base", (0.0, 0.0, 16.0, 16.0)), (1, "base", (-6.0, 0.0, 24.0, 30.0))]
    assert torch.allclose(plot.token_boxes(model, batch, 0, pics)[16:],
                          grid_boxes((-6, 0, 24, 30), 4, 4))


def test_token_units_without_a_picture(toy_models):
    model = toy_models["toy-gated"]
    from tl_vlm.toy import make_examples

    batch = model.prepare(make_examples(2).prompts)
    assert torch.equal(plot.token_boxes(model, batch), grid_boxes((0, 0, 6, 6), 6, 6))


# -- what the figures draw -----------------------------------------------------------------
def test_image_scores_draws_each_token_in_its_cell(tiny_zoo):
    model = tiny_zoo.model("llava_onevision")
    pic = picture(24, 40)
    batch = model.prepare(["what is this"], images=[pic])
    pos = batch.positions
    per_position = torch.arange(pos.seq_len, dtype=torch.float32)   # score = position
    fig = plot.image_scores(model, batch, per_position, images=pic, score_name="position")
    heatmaps = [t for t in fig.data if t.type == "heatmap"]
    images = [t for t in fig.data if t.type == "image"]
    assert len(heatmaps) == 2 and len(images) == 2            # base and tiles, each on the picture
    for heat, placed in zip(heatmaps, plot.place_tokens(model, batch, 0, pic)):
        want = pos.image[0][placed.tokens.clamp(min=0)].float().numpy()
        want[placed.tokens.numpy() < 0] = np.nan
        np.testing.assert_array_equal(np.asarray(heat.z), want)
        h, w = placed.view.cell_size
        assert (heat.x0, heat.dx) == (placed.view.box[0] + w / 2, w)
    # per image token gives the same figure as per position
    same = plot.image_scores(model, batch, per_position[pos.image[0]], images=pic,
                             score_name="position")
    assert [np.asarray(t.z).tolist() for t in same.data if t.type == "heatmap"] == \
        [np.asarray(t.z).tolist() for t in heatmaps]
    bar = fig.layout.coloraxis.colorbar
    assert bar.title.text == "position" and bar.exponentformat == "e"


def test_image_scores_axes_are_tight(tiny_zoo):
    # Janus: the tokens reach 8 px above and below the picture, and no further
    model = tiny_zoo.model("janus")
    pic = picture(24, 40)
    batch = model.prepare(["what is this"], images=[pic])
    fig = plot.image_scores(model, batch, torch.rand(batch.positions.seq_len), images=pic)
    assert list(fig.layout.xaxis.range) == [0.0, 40.0]
    assert list(fig.layout.yaxis.range) == [32.0, -8.0]        # y down, as on the picture
    assert fig.layout.yaxis.scaleanchor == "x"


def test_image_scores_errors_say_what_to_pass(tiny_zoo):
    model = tiny_zoo.model("llava_onevision")
    batch = model.prepare(["what is this"], images=[picture(24, 40)])
    with pytest.raises(ValueError, match=r"one value per position \(\d+.*or per image token"):
        plot.image_scores(model, batch, torch.zeros(3), images=picture(24, 40))
    with pytest.raises(ValueError, match="1 image\\(s\\) but 2 picture"):
        plot.image_scores(model, batch, torch.zeros(batch.positions.seq_len),
                          images=[picture(24, 40)] * 2)
    with pytest.raises(LayoutError, match="picture is 20x24 .* processor saw 40x24"):
        plot.token_boxes(model, batch, 0, picture(24, 20))


def test_llava_with_cls_feature_is_refused(tiny_zoo):
    model = tiny_zoo.model("llava")
    with pytest.raises(LayoutError, match="CLS feature"):
        import copy
        cfg = copy.copy(model.layout.config)
        cfg.vision_feature_select_strategy = "full"
        type(model.layout)(model.layout.processor, cfg).image_views(1, 17, (16, 16))


def test_layer_figures():
    fig = plot.layer_curves({"a": [0.1, 0.2, 0.3]}, bands={"iqr": ([0, 0, 0], [1, 1, 1])},
                            hlines={"chance": 0.25}, y_title="accuracy")
    assert [t.name for t in fig.data] == ["iqr", "a"] and fig.layout.yaxis.title.text == "accuracy"
    with pytest.raises(ValueError, match="curve 'b' has 2 values for 3 layers"):
        plot.layer_curves({"a": [1, 2, 3], "b": [1, 2]})
    heat = plot.layer_heatmap(np.eye(3), ["x", "y", "z"], score_name="share")
    assert heat.layout.coloraxis.colorbar.title.text == "share"


def test_contribution_map_is_tight_and_titled():
    grid = np.arange(36.0).reshape(6, 6) * 1e-7          # tiny shares: no "160n" ticks
    fig = plot.contribution_map({"grid_map": grid.tolist(), "map_layers": "2-3"})
    assert list(fig.layout.xaxis.range) == [0.0, 6.0] and list(fig.layout.yaxis.range) == [6.0, 0.0]
    bar = fig.layout.coloraxis.colorbar
    assert bar.title.text == "share" and bar.exponentformat == "e"
    assert plot.contribution_map({"grid_map": None}) is None


def test_layout_geometry_examples_run():
    """The examples of the geometry helpers in tl_vlm.core.layout (that module is not in
    test_doctests' list)."""
    for obj in (layout_module.ImageView, layout_module.padded_square_box,
                layout_module.resize_crop_box, layout_module.ImageLayout.image_views):
        runner = doctest.DocTestRunner()
        for test in doctest.DocTestFinder().find(obj):
            runner.run(test)
        result = runner.summarize(verbose=False)
        assert result.failed == 0 and result.attempted > 0, obj


def test_onevision_without_a_picture_draws_two_token_maps(tiny_zoo):
    model = tiny_zoo.model("llava_onevision")
    batch = model.prepare(["what is this"], images=[picture(24, 40)])
    placed = plot.place_tokens(model, batch)
    assert [(p.view.name, p.view.box) for p in placed] == \
        [("base", (0.0, 0.0, 4.0, 4.0)), ("tiles", (0.0, 0.0, 6.0, 4.0))]
    fig = plot.image_scores(model, batch, torch.zeros(batch.positions.seq_len))
    assert [t.type for t in fig.data] == ["heatmap", "heatmap"]
