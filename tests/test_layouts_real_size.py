"""Every family's image-token layout at the released checkpoints' image sizes.

The processors come from ``tests/real_size.py`` (transformers' default image-processor
settings, the released checkpoints' overrides, small tokenizers holding the real special
tokens); no model is built. For each image, three sources must agree:

* ``ImageLayout.locate``: the content grid (row widths), row breaks, BOI and EOI;
* the processor's own output: the positions it marks as image tokens
  (``mm_token_type_ids``; Gemma 3's ``token_type_ids``; for Janus, which marks none, the
  image tokens it writes), as a mask and, per image, as the number of marked positions
  in that image's block (its run of image-side positions). No private processor method is read: what a private helper counts
  changes between releases (transformers 5.25 stopped counting BOI/EOI and row breaks
  in ``_get_num_multimodal_tokens``), what the processor writes is the contract;
* ``EXPECTED``: the grid worked out by hand from each processor's documented resize rule
  and the tower's patch/merge geometry (derivations in the comments). This table is the
  per-family record for the closing note.
"""

from __future__ import annotations

from functools import cache

import pytest
import torch

from tests import real_size
from tests.tiny import image
from tl_vlm.adapters import families

PHOTO, WIDE, TALL, SMALL = real_size.PHOTO, real_size.WIDE, real_size.TALL, real_size.SMALL
Expected, _fixed = real_size.Expected, real_size.fixed


def _onevision(rows: int, cols: int) -> Expected:
    """A prompt's only image: 27x27 base features, then the unpadded tile map, each of
    its rows ended by a newline feature."""
    return Expected(((27, 27), (rows, cols)), breaks=rows)


# (height, width) -> Expected, per family.
EXPECTED: dict[str, dict[tuple[int, int], Expected]] = {
    # Shortest edge to 512 px, centre crop 512x512; 4 stride-2 VQ downsamplings: 32x32.
    "chameleon": _fixed(32, 32, (512, 512), PHOTO, WIDE, TALL),
    # Each side rounded to a multiple of 8 px, area kept in [512^2, 1024^2]; one code per
    # 8x8 px, each code row followed by an EOL slot.
    "emu3": {
        (512, 512): Expected(((64, 64),), breaks=64),
        PHOTO: Expected(((60, 80),), breaks=60),      # 307200 px: in range, kept
        WIDE: Expected(((96, 170),), breaks=96),      # 2073600 px > 1024^2: /1.40625, floor
        TALL: Expected(((170, 96),), breaks=170),
        SMALL: Expected(((64, 64),), breaks=64),      # below 512^2: x12.8, ceil to 512x512
    },
    # 896x896 (pan-and-scan off), 64x64 patches of 14 px, average-pooled 4x4: 16x16.
    "gemma3": _fixed(16, 16, (896, 896), PHOTO, WIDE, TALL),
    # Padded to a square, resized to 384 px; 16 px patches: 24x24.
    "janus": _fixed(24, 24, (384, 384), PHOTO, WIDE, TALL),
    # Shortest edge to 336 px, centre crop 336x336; 14 px patches: 24x24 (CLS dropped).
    "llava": _fixed(24, 24, (336, 336), PHOTO, WIDE, TALL),
    # 384 px tiles of 27x27 features; the tile grid is the pinpoint that keeps the most
    # pixels, then wastes the least; the stitched map is unpadded to the image's aspect
    # ratio and shrunk (bilinear, floor) when above anyres_max_9's 9 * 729 features by
    # more than 1.1x in scale.
    "llava_onevision": {
        (384, 384): _onevision(27, 27),   # 1x1 tile
        PHOTO: _onevision(40, 54),        # 768x768 -> 54x54, unpad rows round(480*54/640)=40
        WIDE: _onevision(60, 108),        # 1152x1920 -> 81x135, unpad 75x135, shrink /1.2423
        TALL: _onevision(108, 60),
        SMALL: _onevision(27, 27),        # 1x1 tile
    },
    # Longest edge down to <= 1024 px (floor), then each side up to a multiple of 16 px;
    # [IMG_BREAK] ends every row but the last, which [IMG_END] ends.
    "pixtral": {
        (1024, 1024): Expected(((64, 64),), breaks=63),
        PHOTO: Expected(((30, 40),), breaks=29),      # under 1024 px: 480/16 x 640/16
        WIDE: Expected(((36, 64),), breaks=35),       # /1.875 -> 576x1024 px
        TALL: Expected(((64, 36),), breaks=63),
        SMALL: Expected(((3, 3),), breaks=2),         # ceil(40/16) = 3
    },
    # Each side rounded to a multiple of 28 px (14 px patches, 2x2 merge), area kept in
    # [3136, 12845056] px; one token per 28x28 px.
    "qwen2_vl": {
        PHOTO: Expected(((17, 23),)),     # 476x644 px
        WIDE: Expected(((39, 69),)),      # 1092x1932 px
        TALL: Expected(((69, 39),)),
        (448, 448): Expected(((16, 16),)),
        SMALL: Expected(((2, 2),)),       # 28x28 px < 3136: scaled up to 56x56 px
    },
}
EXPECTED["qwen2_5_vl"] = EXPECTED["qwen2_vl"]  # same processor and released settings
# Families whose tiny module (tests/tiny/<name>.py) carries its own table (REAL_SIZE).
EXPECTED.update(real_size.tiny_module_tables())

# A multi-image LLaVA-OneVision prompt keeps only each image's base features + a newline.
ONEVISION_BASE_ONLY = Expected(((27, 27),), breaks=1)


def _layout_counted(family: str) -> tuple[str, ...]:
    """The position sets the processor counts per image, as the family's layout declares."""
    from tl_vlm.adapters import families

    return next(f.layout for f in families() if f.name == family).processor_counted


def test_every_family_is_covered():
    assert sorted(EXPECTED) == sorted(f.name for f in families()) == sorted(real_size.BUILDERS)


@cache
def _layout(family: str, **kwargs):
    """The family's layout over its released-size processor (``layout.processor``)."""
    released = real_size.BUILDERS[family](**kwargs)
    return {f.name: f.layout for f in families()}[family](released.processor, released.config)


@cache
def _picture(size: tuple[int, int]):
    return image(sum(size), size)


def _process(layout, prompts: list[str], sizes: list[list[tuple[int, int]]], side: str):
    """What ``HookedVLM.prepare`` does, without a model: placeholders, processor, locate."""
    per_prompt = [[_picture(s) for s in prompt_sizes] for prompt_sizes in sizes]
    texts = [layout.with_placeholders(p, len(imgs)) for p, imgs in zip(prompts, per_prompt)]
    inputs = dict(layout.processor(text=texts, images=layout.processor_images(per_prompt),
                                   return_tensors="pt", padding=True, padding_side=side,
                                   return_mm_token_type_ids=True))
    return inputs, layout.locate(inputs["input_ids"], inputs.get("attention_mask"), inputs)


def _processor_image_mask(family: str, layout, inputs) -> torch.Tensor:
    """The positions the processor itself marks as image tokens (a tiny module may say
    how its processor marks them: ``processor_image_mask(layout, inputs)``)."""
    module = real_size.tiny_modules().get(family)
    if module is not None and hasattr(module, "processor_image_mask"):
        return module.processor_image_mask(layout, inputs)
    if family == "janus":  # its image_token_ids is unset: use the tokens it writes
        proc = layout.processor
        ids = layout.tokenizer.convert_tokens_to_ids(
            [proc.image_token, proc.image_start_token, proc.image_end_token])
        return torch.isin(inputs["input_ids"], torch.tensor(ids))
    marks = inputs.get("mm_token_type_ids", inputs.get("token_type_ids"))  # Gemma 3: the latter
    return torch.as_tensor(marks) == 1


def _image_block(pos, b: int, start: int) -> tuple[int, int]:
    """``[lo, hi)``: the maximal run of image-side positions (BOI, content, row breaks,
    specials, EOI) of row b around position ``start``, i.e. one image's block (every test
    prompt has text between its images, so blocks do not merge)."""
    side = pos.image_side.mask[b].tolist()
    lo = hi = start
    while lo > 0 and side[lo - 1]:
        lo -= 1
    while hi < len(side) and side[hi]:
        hi += 1
    return lo, hi


def _processor_counts(family: str, layout, inputs, pos, b: int) -> list[int]:
    """The processor's own token count of each image of row b: the positions it marks
    inside that image's block (one run of marks for most processors, several where it
    marks only the content of an image cut into crops, as SmolVLM's); every mark must
    lie in some image's block."""
    mask = _processor_image_mask(family, layout, inputs)[b]
    counts = [int(mask[slice(*_image_block(pos, b, start))].sum())
              for start in _image_starts(pos, b)]
    assert sum(counts) == int(mask.sum()), "the processor marks positions outside the images"
    return counts


def _image_starts(pos, b: int) -> list[int]:
    """The first content position of each image of row b."""
    grid, content = pos.grid[b], pos.image[b]
    return [int(content[grid[:, 0] == n].min()) for n in range(pos.n_images(b))]


def _row_widths(pos, b: int, n: int) -> list[int]:
    """Located content of image n as row widths, checking row-major order and full rows."""
    grid = pos.grid[b]
    cells = grid[grid[:, 0] == n, 1:].tolist()
    assert cells == sorted(cells), f"image {n}: grid not in row-major order"
    widths = []
    for r in range(max(r for r, _ in cells) + 1):
        cols = [c for rr, c in cells if rr == r]
        assert cols == list(range(len(cols))), f"image {n} row {r}: columns {cols[:5]}..."
        widths.append(len(cols))
    return widths


def _check_image(family: str, layout, inputs, pos, b: int, n: int, expected: Expected) -> None:
    """Image n of row b: its grid, breaks, BOI/EOI, and the processor's count of it."""
    assert _row_widths(pos, b, n) == expected.row_widths
    starts = _image_starts(pos, b) + [pos.seq_len]
    # BOI sits between the previous image's content and this one's; breaks and EOI
    # between this image's first content token and the next image's.
    lo, start, stop = (starts[n - 1] if n else -1), starts[n], starts[n + 1]
    count = {"boi": sum(lo < p < start for p in pos.boi[b].tolist()),
             "image": int((pos.grid[b][:, 0] == n).sum()),
             "row_breaks": sum(start < p < stop for p in pos.row_breaks[b].tolist()),
             "eoi": sum(start < p < stop for p in pos.eoi[b].tolist())}
    # Other image-side tokens (crop markers, tile labels) anywhere in the image's block.
    count["specials"] = int(pos.specials.mask[b][slice(*_image_block(pos, b, start))].sum())
    assert count["row_breaks"] == expected.breaks
    assert count["boi"] == int(layout.boi_token is not None)
    assert count["eoi"] == int(layout.eoi_token is not None)
    counts = _processor_counts(family, layout, inputs, pos, b)
    assert sum(count[name] for name in _layout_counted(family)) == counts[n]


def _check_mask(family: str, layout, inputs, pos) -> None:
    located = torch.zeros_like(pos.padding.mask)
    for name in _layout_counted(family):
        located |= getattr(pos, name).mask
    assert torch.equal(located, _processor_image_mask(family, layout, inputs))


CASES = [(family, size) for family, sizes in EXPECTED.items() for size in sizes]


# (conftest parametrizes any argument called ``family`` over the tiny specs: use ``name``.)
@pytest.mark.parametrize("name, size", CASES, ids=[f"{f}-{h}x{w}" for f, (h, w) in CASES])
def test_one_image(name, size):
    family = name
    layout = _layout(family)
    inputs, pos = _process(layout, ["what is this"], [[size]], side="right")
    assert pos.n_images(0) == 1
    _check_image(family, layout, inputs, pos, 0, 0, EXPECTED[family][size])
    _check_mask(family, layout, inputs, pos)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_mixed_sizes_in_a_padded_batch(name, side):
    """A one-image prompt and a two-image prompt of other sizes, padded on either side."""
    family = name
    layout = _layout(family)
    ph = layout.placeholder
    sizes = [[PHOTO], [WIDE, TALL]]
    inputs, pos = _process(layout, ["what is this", f"{ph} a cat {ph} describe the image"],
                           sizes, side)
    padded = pos.padding[int(pos.padding.counts.argmax())].tolist()
    assert padded and pos.padding.counts.min() == 0
    assert padded[0 if side == "left" else -1] == (0 if side == "left" else pos.seq_len - 1)
    for b, row_sizes in enumerate(sizes):
        assert pos.n_images(b) == len(row_sizes)
        for n, size in enumerate(row_sizes):
            expected = EXPECTED[family][size]
            if family == "llava_onevision" and len(row_sizes) > 1:
                expected = ONEVISION_BASE_ONLY
            module = real_size.tiny_modules().get(family)
            if len(row_sizes) > 1 and hasattr(module, "REAL_SIZE_MULTI_IMAGE"):
                expected = module.REAL_SIZE_MULTI_IMAGE[size]  # images of a multi-image prompt
            _check_image(family, layout, inputs, pos, b, n, expected)
    _check_mask(family, layout, inputs, pos)


@pytest.mark.parametrize("whole_numbers", [True, False])
def test_emu3_size_prefix_of_either_tokenisation(whole_numbers):
    """"96*170" as 3 tokens (converted HF tokenizer) or 6 (one per digit)."""
    layout = _layout("emu3", whole_numbers=whole_numbers)
    inputs, pos = _process(layout, ["what is this"], [[WIDE]], side="right")
    _check_image("emu3", layout, inputs, pos, 0, 0, EXPECTED["emu3"][WIDE])
    prefix = pos.specials[0].tolist()[:-1]  # size prefix and wrapper, then EOF
    text = layout.tokenizer.convert_ids_to_tokens(inputs["input_ids"][0, prefix].tolist())
    assert "".join(text) == f"96*170{layout.wrapper_token}"
    assert len(prefix) == (4 if whole_numbers else 7)
