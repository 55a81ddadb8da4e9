"""Tiny Aya Vision: SigLIP tower (16 px tiles, 4 px patches: 4x4, pixel-shuffled by 2 to
2x2 = 4 ``<|IMG_PATCH|>`` per tile) + a 2-layer Cohere2 decoder (one sliding layer with
RoPE, window 8, one full layer without), ``logit_scale`` 0.25.

Tiles: 16 px, 1 to 4 per picture (the grid whose aspect ratio is closest to the
picture's). A 16x32 (h x w) picture -> 1x2 tiles + thumbnail; a 30x18 one -> 2x1 tiles +
thumbnail; a 20x24 one -> a single tile (only the ``TILE_GLOBAL`` part).
"""

import torch

from tests.real_size import Expected, PHOTO, Released, SMALL, TALL, WIDE
from tests.tiny import TinySpec, image, make_tokenizer

START, END, PATCH = "<|START_OF_IMG|>", "<|END_OF_IMG|>", "<|IMG_PATCH|>"
LINE_BREAK, TILE, TILE_GLOBAL = "<|IMG_LINE_BREAK|>", "TILE", "TILE_GLOBAL"


def tokenizer():
    """The released image strings; ``TILE``/``TILE_GLOBAL`` single tokens (as in HF's
    tiny Aya processor fixture), the tile numbers ``_1``.. ordinary words."""
    return make_tokenizer(["<image>", START, END, PATCH, LINE_BREAK, TILE, TILE_GLOBAL],
                          bos="<BOS_TOKEN>", eos="<|END_OF_TURN_TOKEN|>", pad="<PAD>",
                          extra_vocab=[f"_{k}" for k in range(1, 13)])


def processor(tok, *, img_size=16, patch_size=8, max_patches=4):
    from transformers import AyaVisionProcessor, GotOcr2ImageProcessorPil

    image_processor = GotOcr2ImageProcessorPil(
        size={"height": img_size, "width": img_size}, crop_to_patches=True, min_patches=1,
        max_patches=max_patches, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    return AyaVisionProcessor(image_processor=image_processor, tokenizer=tok,
                              patch_size=patch_size, img_size=img_size)


def build(path):
    from transformers import (AyaVisionConfig, AyaVisionForConditionalGeneration, Cohere2Config,
                              SiglipVisionConfig)

    tok = tokenizer()
    text = Cohere2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         layer_types=["sliding_attention", "full_attention"], sliding_window=8,
                         logit_scale=0.25, max_position_embeddings=512,
                         pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id)
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=4, image_size=16, patch_size=4,
                                vision_use_head=False)
    cfg = AyaVisionConfig(vision_config=vision.to_dict(), text_config=text.to_dict(),
                          downsample_factor=2, image_token_index=tok.convert_tokens_to_ids(PATCH),
                          vision_feature_layer=-1, vision_feature_select_strategy="full")
    model = AyaVisionForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # LayerNorms start at weight 1: check the bridge with others
        for module in model.modules():
            if type(module).__name__ == "Cohere2LayerNorm":
                module.weight.normal_(1.0, 0.3)
    model.save_pretrained(path)
    processor(tok).save_pretrained(path)


SPEC = TinySpec(
    family="aya_vision",
    build=build,
    hf_class="AyaVisionForConditionalGeneration",
    prompts=["what is this", "<image> a cat <image> describe the image a dog"],
    images=[image(0, (16, 32)), [image(1), image(2, (30, 18))]],
    other_images=[image(10, (16, 32)), [image(11), image(12, (30, 18))]],
)


def processor_image_mask(layout, inputs):
    """AyaVisionProcessor marks START, TILE, TILE_GLOBAL, the patches and END
    (``image_token_ids``) but not the tile numbers it writes as text after TILE
    (``_1``, ``_2``, ..): its marks, with those gaps filled from each marked
    ``<|START_OF_IMG|>`` to the next ``<|END_OF_IMG|>``."""
    marks = torch.as_tensor(inputs["mm_token_type_ids"]) == 1
    ids = torch.as_tensor(inputs["input_ids"])
    start, end = (layout.token_id(t) for t in (layout.boi_token, layout.eoi_token))
    filled = marks.clone()
    for b in range(len(ids)):
        inside = False
        for p, tid in enumerate(ids[b].tolist()):
            if marks[b, p] and tid == start:
                inside = True
            if inside:
                filled[b, p] = True
            if marks[b, p] and tid == end:
                inside = False
    return filled


# -- real size ---------------------------------------------------------------------------
def released() -> Released:
    from transformers import AyaVisionConfig, Cohere2Config, SiglipVisionConfig

    tok = tokenizer()
    # CohereLabs/aya-vision-8b preprocessor_config.json: GotOcr2ImageProcessor, size 364x364,
    # min_patches 1, max_patches 12, mean/std 0.5, resample 3; its crop_to_patches false is
    # overridden by AyaVisionProcessor's own images_kwargs default crop_to_patches=True.
    # processor_config.json: img_size 364, patch_size 28 (14 px patches x downsample 2).
    proc = processor(tok, img_size=364, patch_size=28, max_patches=12)
    # config.json: SigLIP at 364 px with 14 px patches, downsample_factor 2.
    config = AyaVisionConfig(
        vision_config=SiglipVisionConfig(image_size=364, patch_size=14,
                                         vision_use_head=False).to_dict(),
        text_config=Cohere2Config(vocab_size=len(tok)).to_dict(), downsample_factor=2,
        image_token_index=tok.convert_tokens_to_ids(PATCH))
    return Released(proc, config)


def tiles(n_tiles: int, side: int = 13) -> Expected:
    """``n_tiles`` tiles of ``side x side`` features and the thumbnail (none for one tile)."""
    return Expected(((side, side),) * (n_tiles + 1 if n_tiles > 1 else 1))


# Tile grids (cols x rows) with 1..12 tiles, sorted by tile count; the picture takes the
# one whose cols/rows is closest to its width/height; on a tie, the later (more tiles)
# one while the picture's area exceeds half of the tiles' area (364^2 per tile). Every
# tile and the thumbnail: 364 / 14 = 26 patches, pixel-shuffled by 2: 13x13 features.
REAL_SIZE = {
    (364, 364): tiles(1),   # ratio 1: 1x1 first; 2x2 (area 132496 < 0.5 * 4 * 364^2) not taken
    PHOTO: tiles(12),       # 4/3: 4x3 (diff 0) -> 12 tiles
    WIDE: tiles(8),         # 16/9: 2x1 (diff 0.22); 4x2 ties, 1920*1080 > 0.5 * 8 * 364^2: 4x2
    TALL: tiles(8),         # 9/16: 1x2 (diff 0.0625); 2x4 ties, area large enough: 2x4
    SMALL: tiles(1),        # ratio 1, area 1600: 1x1, no thumbnail
}
