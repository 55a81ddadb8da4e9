"""Tiny InternVL: InternViT tower (16 px tiles, 2 px patches -> 8x8, pixel shuffle 0.5 ->
4x4 = 16 features per tile) + a 2-layer Qwen2.

The processor cuts each image into at most 4 tiles of 16 px (GotOcr2, ``crop_to_patches``
on, as ``InternVLProcessor`` sets it) plus a thumbnail when there is more than one tile:
a 20x24 (h x w) image is 1 tile (16 tokens), a 16x40 one 3x1 tiles + thumbnail (64
tokens). Every image is ``<img>`` + ``<IMG_CONTEXT>`` x (16 per tile) + ``</img>``.

The InternViT initialises its CLS and position embeddings to zero and its layer scales to
0.1; these are randomised (and the patch embedding scaled up, so that the pixels, not the
positions, dominate the features) so that the image reaches the logits through the
``</img>`` gate as well.
"""

from tests.real_size import PHOTO, SMALL, TALL, WIDE, Expected, Released
from tests.tiny import TinySpec, image, make_tokenizer

IMG, BOI, EOI, VIDEO = "<IMG_CONTEXT>", "<img>", "</img>", "<video>"


def tokenizer():
    # No padding_side, like the released tokenizers (InternVLProcessor then pads left;
    # the layout records the tokenizer's side so that prepare(padding_side=...) wins).
    return make_tokenizer(
        [BOI, EOI, IMG, VIDEO],
        extra_special_tokens={"start_image_token": BOI, "end_image_token": EOI,
                              "context_image_token": IMG, "video_token": VIDEO})


def build(path, text_model="qwen2"):
    """``text_model``: "qwen2" (InternVL3) or "qwen3" (InternVL3.5: q/k norms)."""
    import torch
    from transformers import (GotOcr2ImageProcessorPil, InternVLConfig,
                              InternVLForConditionalGeneration, InternVLProcessor,
                              InternVLVisionConfig, Qwen2Config, Qwen3Config)

    tok = tokenizer()
    text_cls = {"qwen2": Qwen2Config, "qwen3": Qwen3Config}[text_model]
    cfg = InternVLConfig(
        text_config=text_cls(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                             max_position_embeddings=256, pad_token_id=tok.pad_token_id,
                             tie_word_embeddings=False),
        vision_config=InternVLVisionConfig(hidden_size=32, intermediate_size=64,
                                           num_hidden_layers=2, num_attention_heads=4,
                                           image_size=16, patch_size=2),
        image_token_id=tok.convert_tokens_to_ids(IMG), image_seq_length=16,
        downsample_ratio=0.5, vision_feature_layer=-1, vision_feature_select_strategy="default",
        tie_word_embeddings=False,
    )
    cfg.architectures = ["InternVLForConditionalGeneration"]
    model = InternVLForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # undo the zero / small inits that would hide the image
        emb = model.model.vision_tower.embeddings
        emb.patch_embeddings.projection.weight.normal_(0.0, 0.5)  # pixels over positions
        emb.cls_token.normal_(0.0, 0.1)
        emb.position_embeddings.normal_(0.0, 0.1)
        for layer in model.model.vision_tower.encoder.layer:
            layer.lambda_1.fill_(1.0)
            layer.lambda_2.fill_(1.0)
        for p in model.model.multi_modal_projector.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.3)
    model.save_pretrained(path)
    processor = InternVLProcessor(
        image_processor=GotOcr2ImageProcessorPil(size={"height": 16, "width": 16},
                                                 crop_to_patches=True, min_patches=1,
                                                 max_patches=4),
        tokenizer=tok, image_seq_length=16)
    processor.save_pretrained(path)


SPEC = TinySpec(
    family="internvl",
    build=build,
    hf_class="InternVLForConditionalGeneration",
    prompts=["what is this", f"{IMG} a cat {IMG} describe the image a dog"],
    images=[image(0), [image(1), image(2, (16, 40))]],
    other_images=[image(10), [image(11), image(12, (16, 40))]],
)


# -- real size ---------------------------------------------------------------------------
def released() -> Released:
    from transformers import (GotOcr2ImageProcessorPil, InternVLConfig, InternVLProcessor,
                              InternVLVisionConfig, Qwen2Config)

    tok = tokenizer()
    # convert_internvl_weights_to_hf.py (write_image_processor), as in
    # OpenGVLab/InternVL3-1B-hf preprocessor_config.json: GotOcr2ImageProcessor, size
    # 448x448, ImageNet mean/std; min_patches 1 / max_patches 12 are the class defaults;
    # crop_to_patches is turned on by InternVLProcessor's own images_kwargs default.
    image_processor = GotOcr2ImageProcessorPil(size={"height": 448, "width": 448},
                                               image_mean=[0.485, 0.456, 0.406],
                                               image_std=[0.229, 0.224, 0.225],
                                               min_patches=1, max_patches=12)
    # InternVLProcessor default image_seq_length 256 = (448 // 14) ** 2 * 0.5 ** 2.
    processor = InternVLProcessor(image_processor=image_processor, tokenizer=tok,
                                  image_seq_length=256)
    # InternVLConfig / InternVLVisionConfig defaults are InternVL3-1B-hf's: InternViT-300M
    # at 448 px, 14 px patches, downsample_ratio 0.5, strategy "default" (CLS dropped).
    config = InternVLConfig(text_config=Qwen2Config(vocab_size=len(tok)),
                            vision_config=InternVLVisionConfig(image_size=448, patch_size=14),
                            image_token_id=tok.convert_tokens_to_ids(IMG),
                            downsample_ratio=0.5)
    return Released(processor, config)


def _tiles(n: int) -> Expected:
    """``n`` tile blocks of 16x16 features stacked top to bottom (layout convention)."""
    return Expected(((16 * n, 16),))


# 448 px tiles, 16x16 features each (32x32 patches of 14 px, pixel shuffle 0.5). Tile grid
# (cols x rows, at most 12 tiles): the arrangement whose cols/rows is closest to the
# picture's width/height; on a tie the one with more tiles, while the picture's area is
# over half the tiles' area. More than one tile adds a thumbnail block.
REAL_SIZE = {
    # aspect 1: 1x1 (diff 0); ties 2x2, 3x3 lose (448^2 < 0.5 * 4 * 448^2): 1 block
    (448, 448): _tiles(1),
    # 640/480 = 4/3 exactly: 4x3 = 12 tiles (diff 0) + thumbnail = 13 blocks
    PHOTO: _tiles(13),
    # 1920/1080 = 1.78: 2x1 (diff 0.22), then 4x2 ties and wins (2073600 > 0.5 * 8 * 448^2
    # = 802816); 6x3 is over 12 tiles: 8 tiles + thumbnail = 9 blocks
    WIDE: _tiles(9),
    # 1080/1920 = 0.5625: 1x2 (diff 0.0625), 2x4 ties and wins likewise: 9 blocks
    TALL: _tiles(9),
    # aspect 1, 1600 px^2: 1x1, no thumbnail
    SMALL: _tiles(1),
}
