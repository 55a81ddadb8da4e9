"""Tiny LLaVA-NeXT: CLIP tower (16 px tiles, 4 px patches -> 4x4 base grid, CLS dropped) +
a 2-layer Llama.

``image_grid_pinpoints`` [[16, 32], [32, 16]] (like the released list, no single-tile
resolution): every image, also in a prompt with two, is its 4x4 base features, then its
unpadded tile map with a newline feature after each row. A 20x24 (h x w) image takes
16x32 (1x2 tiles -> a 4x8 map) and keeps 4 of its 8 cols (int(24 * 4/20) = 4, padding
(8 - 4) // 2 = 2 each side): 16 + 4 x (4 + 1) = 36 tokens. A 30x18 image takes 32x16
(2x1 tiles -> 8x4) and keeps 6 of its 8 rows (int(30 * 4/18) = 6, padding 1): 16 + 6 x 5
= 46 tokens. Every feature is ``<image>``.
"""

from tests.real_size import PHOTO, SMALL, TALL, WIDE, Expected, Released
from tests.tiny import TinySpec, image, make_tokenizer

PINPOINTS = [[16, 32], [32, 16]]


def tokenizer():
    return make_tokenizer(["<image>"], extra_special_tokens={"image_token": "<image>"})


def build(path):
    from transformers import (CLIPVisionConfig, LlamaConfig, LlavaNextConfig,
                              LlavaNextForConditionalGeneration, LlavaNextImageProcessorPil,
                              LlavaNextProcessor)

    tok = tokenizer()
    cfg = LlavaNextConfig(
        text_config=LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                max_position_embeddings=256, pad_token_id=tok.pad_token_id),
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, image_size=16, patch_size=4,
                                       projection_dim=32),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2, vision_feature_select_strategy="default",
        image_grid_pinpoints=PINPOINTS,
    )
    cfg.architectures = ["LlavaNextForConditionalGeneration"]
    LlavaNextForConditionalGeneration(cfg).eval().save_pretrained(path)
    processor = LlavaNextProcessor(
        image_processor=LlavaNextImageProcessorPil(
            size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16},
            image_grid_pinpoints=PINPOINTS),
        tokenizer=tok, patch_size=4, vision_feature_select_strategy="default",
        num_additional_image_tokens=1)
    processor.save_pretrained(path)


SPEC = TinySpec(
    family="llava_next",
    build=build,
    hf_class="LlavaNextForConditionalGeneration",
    prompts=["what is this", "<image> a cat <image> describe the image a dog"],
    images=[image(0), [image(1), image(2, (30, 18))]],
    other_images=[image(10), [image(11), image(12, (30, 18))]],
)


# -- real size ---------------------------------------------------------------------------
RELEASED_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]


def released() -> Released:
    from transformers import (CLIPVisionConfig, LlavaNextConfig, LlavaNextImageProcessorPil,
                              LlavaNextProcessor, MistralConfig)

    tok = tokenizer()
    # convert_llava_next_weights_to_hf.py: LlavaNextImageProcessor.from_pretrained of the
    # CLIP tower (openai/clip-vit-large-patch14-336: shortest edge 336, centre crop 336;
    # the class default is 224) with the class default image_grid_pinpoints, as in
    # llava-hf/llava-v1.6-mistral-7b-hf preprocessor_config.json; processor_config.json:
    # patch_size 14, vision_feature_select_strategy "default", num_additional_image_tokens 1.
    image_processor = LlavaNextImageProcessorPil(size={"shortest_edge": 336},
                                                 crop_size={"height": 336, "width": 336},
                                                 image_grid_pinpoints=RELEASED_PINPOINTS)
    processor = LlavaNextProcessor(image_processor=image_processor, tokenizer=tok, patch_size=14,
                                   vision_feature_select_strategy="default",
                                   num_additional_image_tokens=1)
    # LlavaNextConfig defaults (the converted config.json): CLIP ViT-L/14 at 336 px,
    # strategy "default", vision_feature_layer -2, the pinpoints above.
    config = LlavaNextConfig(text_config=MistralConfig(vocab_size=len(tok)),
                             vision_config=CLIPVisionConfig(image_size=336, patch_size=14),
                             image_token_index=tok.convert_tokens_to_ids("<image>"),
                             vision_feature_select_strategy="default", vision_feature_layer=-2,
                             image_grid_pinpoints=RELEASED_PINPOINTS)
    return Released(processor, config)


def _next(rows: int, cols: int) -> Expected:
    """24x24 base features, then the unpadded rows x cols tile map, each of its rows ended
    by a newline feature."""
    return Expected(((24, 24), (rows, cols)), breaks=rows)


# 336 px tiles of 24x24 features. The pinpoint (h, w) is the one that keeps the most of
# the picture's pixels when it is scaled into it (capped at the picture's own area), then
# wastes the least (the first wins a full tie). The stitched map is unpadded: along the
# side where the picture fills the map it is kept whole; along the other,
# int(short * map_long / long) features are the picture, and (map - that) // 2 are cut
# from each end.
REAL_SIZE = {
    # all five pinpoints hold the whole 336x336 px; 336x672 and 672x336 waste the least,
    # the first wins: 1x2 tiles -> 24x48, cols kept int(336 * 24/336) = 24, cut 12 each
    (336, 336): _next(24, 24),
    # 336x672 exactly: no unpadding, 24x48
    (336, 672): _next(24, 48),
    # 672x672 (x1.05, 640x480 kept whole): 2x2 tiles -> 48x48; rows kept
    # int(480 * 48/640) = 36, cut 6 each
    PHOTO: _next(36, 48),
    # 672x672 (x0.35 -> 672x378 px, more than 336x1008's 597x336): 48x48; rows kept
    # int(1080 * 48/1920) = 27, (48 - 27) // 2 = 10 cut each side -> 28
    WIDE: _next(28, 48),
    TALL: _next(48, 28),
    # like 336x336: every pinpoint holds the 40x40 picture; 1x2 tiles, cols 24 of 48
    SMALL: _next(24, 24),
}
