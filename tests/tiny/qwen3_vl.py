"""Tiny Qwen3-VL: 4 px patches, 2x2 merge (8 px per text-side token), a 2-block tower with
DeepStack taps after both blocks (so DeepStack adds to the output of both decoder layers,
the last one included), and a 2-layer decoder with q/k norms, GQA, head_dim 16 and
interleaved M-RoPE.

Images are multiples of 8 px so ``smart_resize`` keeps them: 16x24 -> a 2x3 grid,
16x16 -> 2x2, 24x16 -> 3x2 (rows x cols of ``<|image_pad|>``).

Real size: ``released()`` is the Qwen3-VL processor at the released settings (16 px
patches, 2x2 merge: 32 px per token; pixel range [65536, 16777216]).
"""

from tests.real_size import PHOTO, SMALL, TALL, WIDE, Expected, Released
from tests.tiny import TinySpec, image, make_tokenizer

SPECIALS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]


def tokenizer():
    return make_tokenizer(SPECIALS)


def token_ids(tok):
    ids = tok.convert_tokens_to_ids
    return dict(image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
                vision_start_token_id=ids("<|vision_start|>"),
                vision_end_token_id=ids("<|vision_end|>"))


def image_processor():
    from transformers import Qwen2VLImageProcessorPil

    # min/max pixels keep every test image at its own (already 8-aligned) size.
    return Qwen2VLImageProcessorPil(size={"shortest_edge": 64, "longest_edge": 576},
                                    patch_size=4, temporal_patch_size=2, merge_size=2,
                                    image_mean=[0.5] * 3, image_std=[0.5] * 3)


def text_config(tok, **extra):
    return dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                max_position_embeddings=256,
                # interleaved M-RoPE over head_dim / 2 = 8 frequencies: T 4, H 2, W 2
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                 "mrope_section": [4, 2, 2], "mrope_interleaved": True},
                pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id, **extra)


VISION = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=32,
              patch_size=4, spatial_merge_size=2, temporal_patch_size=2,
              num_position_embeddings=16,          # a 4x4 learned grid, resampled per image
              deepstack_visual_indexes=[0, 1])     # DeepStack into decoder layers 0 and 1


def randomise(model, seed=None):
    """Re-draw every parameter so image features are far from zero and reach the logits
    (from the global generator, or from one seeded with ``seed``)."""
    import torch

    generator = None if seed is None else torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                continue
            p.normal_(0.0, 0.2, generator=generator)


def build(path):
    import tl_vlm.adapters  # noqa: F401  (image-only processor without torchvision)
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLProcessor

    tok = tokenizer()
    cfg = Qwen3VLConfig(text_config=text_config(tok), vision_config=VISION,
                        tie_word_embeddings=False, **token_ids(tok))
    model = Qwen3VLForConditionalGeneration(cfg).eval()
    randomise(model)
    model.save_pretrained(path)
    Qwen3VLProcessor(image_processor=image_processor(), tokenizer=tok).save_pretrained(path)


SPEC = TinySpec(
    family="qwen3_vl",
    build=build,
    hf_class="Qwen3VLForConditionalGeneration",
    # The second prompt writes one full placeholder and one bare <|image_pad|>.
    prompts=["what is this",
             "<|vision_start|><|image_pad|><|vision_end|> a cat <|image_pad|> describe the image"],
    images=[image(0, (16, 24)), [image(1, (16, 16)), image(2, (24, 16))]],
    other_images=[image(10, (16, 24)), [image(11, (16, 16)), image(12, (24, 16))]],
    # DeepStack adds image features to the output of decoder layers 0 and 1.
    image_entry_hooks=("blocks.0.deepstack.hook_out", "blocks.1.deepstack.hook_out"),
)


# -- real size ---------------------------------------------------------------------------
def released() -> Released:
    from transformers import Qwen2VLImageProcessorPil, Qwen3VLConfig, Qwen3VLProcessor

    tok = tokenizer()
    # Qwen/Qwen3-VL-*-Instruct preprocessor_config.json: Qwen2VLImageProcessorFast with
    # patch_size 16, temporal_patch_size 2, merge_size 2, image_mean/std 0.5, size
    # {"shortest_edge": 65536, "longest_edge": 16777216} (min/max pixels).
    image_processor = Qwen2VLImageProcessorPil(
        size={"shortest_edge": 65536, "longest_edge": 16777216}, patch_size=16,
        temporal_patch_size=2, merge_size=2, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    processor = Qwen3VLProcessor(image_processor=image_processor, tokenizer=tok)
    # config.json: vision patch_size 16, spatial_merge_size 2 (the class defaults).
    config = Qwen3VLConfig(text_config=dict(vocab_size=len(tok)),
                           vision_config=dict(patch_size=16, spatial_merge_size=2),
                           **token_ids(tok))
    return Released(processor, config)


# smart_resize(h, w, factor=32, min_pixels=65536, max_pixels=16777216): each side rounded
# to the nearest multiple of 32 px; if the area exceeds max_pixels, both sides shrink by
# beta = sqrt(h*w/max) and floor to 32; below min_pixels, both grow by sqrt(min/(h*w)) and
# ceil to 32. One text-side token per 32x32 px (16 px patches merged 2x2).
REAL_SIZE = {
    PHOTO: Expected(((15, 20),)),     # 480x640 = round(15.0)x round(20.0) -> 480x640 px
    WIDE: Expected(((34, 60),)),      # 1080/32 = 33.75 -> 34 (1088), 1920/32 = 60
    TALL: Expected(((60, 34),)),
    (512, 512): Expected(((16, 16),)),
    # 40x40 -> 32x32 px (1024 < 65536): beta = sqrt(65536/1600) = 6.4, ceil(40*6.4/32) = 8
    SMALL: Expected(((8, 8),)),
}
