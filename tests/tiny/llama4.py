"""Tiny Llama 4: a 2-layer Llama 4 ViT on 16 px tiles (4 px patches: 4x4, pixel-shuffled
to 2x2 = 4 features per tile) + a Llama 4 text model with two layers: layer 0 RoPE,
chunked attention (chunks of 8 tokens), L2 q/k norm and a dense MLP; layer 1 NoPE, full
attention with temperature tuning, and a MoE block (4 experts, top-1, shared expert).

The processor fits each picture into a canvas of at most 4 tiles of 16 px: a 20x24
picture into 2x2 tiles (+ a global view), a 16x40 one into 1x3 (+ global), a 12x12 one
into a single tile (no global view). ``floor_scale`` stays at the released 8192, so
temperature tuning is 1 at these lengths: with it active, HF scales queries by their
index in the *padded* sequence and left padding would change the logits (the
``temperature`` variant in ``tests/test_positions_llama4.py`` checks it on its own).
"""

from tests.tiny import TinySpec, image, make_tokenizer

BOI, EOI, IMG, PATCH = "<|image_start|>", "<|image_end|>", "<|image|>", "<|patch|>"
TILE_X, TILE_Y = "<|tile_x_separator|>", "<|tile_y_separator|>"


def tokenizer():
    """The released special-token strings (Llama4Processor's defaults); like the released
    tokenizer, every sequence starts with ``<|begin_of_text|>``."""
    from tokenizers import processors

    tok = make_tokenizer([BOI, EOI, IMG, PATCH, TILE_X, TILE_Y], bos="<|begin_of_text|>",
                         eos="<|eot|>", pad="<|finetune_right_pad|>")
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A $B",
        special_tokens=[("<|begin_of_text|>", tok.bos_token_id)])
    return tok


def build(path, floor_scale=8192):
    import torch
    from transformers import (Llama4Config, Llama4ForConditionalGeneration, Llama4Processor,
                              Llama4TextConfig, Llama4VisionConfig)

    from tl_vlm.adapters.llama4 import allow_pil_image_processor

    tok = tokenizer()
    ids = tok.convert_tokens_to_ids
    text = Llama4TextConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=32, intermediate_size_mlp=64,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        no_rope_layers=[1, 0], moe_layers=[1], num_local_experts=4, num_experts_per_tok=1,
        attention_chunk_size=8, use_qk_norm=True, attn_temperature_tuning=True,
        floor_scale=floor_scale, attn_scale=0.1, max_position_embeddings=256,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id)
    vision = Llama4VisionConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        image_size=16, patch_size=4, pixel_shuffle_ratio=0.5, projector_input_dim=64,
        projector_output_dim=64, vision_output_dim=64)
    cfg = Llama4Config(text_config=text, vision_config=vision, boi_token_index=ids(BOI),
                       eoi_token_index=ids(EOI), image_token_index=ids(PATCH),
                       pad_token_id=tok.pad_token_id)
    model = Llama4ForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # RMSNorm weights start at 1: make them matter
        for name, module in model.named_modules():
            if type(module).__name__ == "Llama4TextRMSNorm":
                module.weight.normal_(1.0, 0.3)
    model.save_pretrained(path)
    image_processor = (allow_pil_image_processor() or _torchvision_processor())(
        size={"height": 16, "width": 16}, max_patches=4)
    processor = Llama4Processor(image_processor=image_processor, tokenizer=tok, patch_size=4,
                                pixel_shuffle_ratio=0.5)
    processor.save_pretrained(path)


def _torchvision_processor():
    """Transformers' own image processor, where torchvision is installed."""
    from transformers import Llama4ImageProcessor

    return Llama4ImageProcessor


SPEC = TinySpec(
    family="llama4",
    build=build,
    hf_class="Llama4ForConditionalGeneration",
    prompts=["what is this", "<|image|> a cat <|image|> describe the image a dog"],
    images=[image(0, (12, 12)), [image(1), image(2, (16, 40))]],
    other_images=[image(10, (12, 12)), [image(11), image(12, (16, 40))]],
)


# -- released size ----------------------------------------------------------------------
def released():
    """meta-llama/Llama-4-Scout-17B-16E-Instruct (and Maverick): the image processor's
    class defaults (336 px tiles, ``max_patches`` 16, ``resize_to_max_canvas`` False, as in
    its ``preprocessor_config.json``), ``Llama4Processor(patch_size=14,
    pixel_shuffle_ratio=0.5)`` (``processor_config.json`` patch_size 14) and the vision
    config's 336 px tiles of 14 px patches (the class default ``image_size`` is 448)."""
    from transformers import Llama4Config, Llama4Processor, Llama4TextConfig, Llama4VisionConfig

    from tests.real_size import Released
    from tl_vlm.adapters.llama4 import allow_pil_image_processor

    tok = tokenizer()
    image_processor = (allow_pil_image_processor() or _torchvision_processor())(
        size={"height": 336, "width": 336}, max_patches=16, resize_to_max_canvas=False)
    processor = Llama4Processor(image_processor=image_processor, tokenizer=tok, patch_size=14,
                                pixel_shuffle_ratio=0.5)
    ids = tok.convert_tokens_to_ids
    config = Llama4Config(
        text_config=Llama4TextConfig(vocab_size=len(tok)),
        vision_config=Llama4VisionConfig(image_size=336, patch_size=14, pixel_shuffle_ratio=0.5),
        boi_token_index=ids(BOI), eoi_token_index=ids(EOI), image_token_index=ids(PATCH))
    return Released(processor, config)


def processor_image_mask(layout, inputs):
    """Llama4Processor's mm_token_type_ids mark only ``<|image|>`` (its ``image_token_id``),
    not the features: the processor's image tokens are the ``<|patch|>`` tokens it writes."""
    import torch

    patch = layout.tokenizer.convert_tokens_to_ids(layout.processor.img_patch_token)
    return torch.as_tensor(inputs["input_ids"]) == patch


def _real_size():
    from tests.real_size import PHOTO, SMALL, TALL, WIDE, Expected

    def tiled(rows, cols):
        # rows x cols tiles of 12x12 features (336 px / 14 px = 24, pixel shuffle 0.5),
        # then the global view; one <|tile_y_separator|> per tile row. One tile: no global.
        n = rows * cols
        return Expected(((12, 12),) * (n + 1 if n > 1 else 1), breaks=rows if n > 1 else 0)

    # Canvases: r x c tiles of 336 px, r * c <= 16; the picture's scale into a canvas is
    # min(336 r / h, 336 c / w); the smallest scale >= 1 wins (else the largest < 1), ties
    # to the smallest canvas.
    return {
        # 480x640: min(0.7 r, 0.525 c) >= 1 first at c = 2, r >= 2: 1.05 -> 2x2
        PHOTO: tiled(2, 2),
        # 1080x1920: nothing reaches 1 (r >= 4 and c >= 6 is 24 tiles); the largest is
        # min(0.311 r, 0.175 c) = 0.875 at 3x5
        WIDE: tiled(3, 5),
        TALL: tiled(5, 3),
        # 40x40: every canvas scales by >= 8.4; the smallest 8.4 one is 1x1
        SMALL: tiled(1, 1),
        # 336x672: min(r, c / 2) = 1 first at 1x2 (and r x 2): the smallest, 1x2
        (336, 672): tiled(1, 2),
    }


REAL_SIZE = _real_size()
