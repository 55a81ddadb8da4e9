"""Tiny GLM-4.1V: 4 px patches, 2x2 merge (8 px per text-side token), a 2-block tower with
a 4x4 learned position grid, and a 2-layer GLM decoder (sandwich norms, q/k/v biases,
hidden 64, GQA 4 heads / 2 kv heads, head_dim 16 with M-RoPE on its first half, as
released).

Images are multiples of 8 px and inside the pixel range, so ``smart_resize`` keeps them:
16x24 -> a 2x3 grid, 16x16 -> 2x2, 24x16 -> 3x2 (rows x cols of ``<|image|>``).

Real size: ``released()`` is GLM-4.1V's processor at the released settings (14 px
patches, 2x2 merge: 28 px per token; pixel range [12544, 9633792] over 2 frames).
"""

from tests.real_size import PHOTO, SMALL, TALL, WIDE, Expected, Released
from tests.tiny import TinySpec, image, make_tokenizer

SPECIALS = ["<|begin_of_image|>", "<|end_of_image|>", "<|image|>",
            "<|begin_of_video|>", "<|end_of_video|>", "<|video|>"]


def tokenizer():
    return make_tokenizer(SPECIALS)


def token_ids(tok):
    ids = tok.convert_tokens_to_ids
    return dict(image_token_id=ids("<|image|>"), video_token_id=ids("<|video|>"),
                image_start_token_id=ids("<|begin_of_image|>"),
                image_end_token_id=ids("<|end_of_image|>"),
                video_start_token_id=ids("<|begin_of_video|>"),
                video_end_token_id=ids("<|end_of_video|>"))


def image_processor():
    from transformers import Glm4vImageProcessorPil

    # GLM's smart_resize counts 2 frames: 2*h*w must lie in [shortest, longest] edge, so
    # [128, 1152] keeps every test image (2*16*24 = 768) at its own 8-aligned size.
    return Glm4vImageProcessorPil(size={"shortest_edge": 128, "longest_edge": 1152},
                                  patch_size=4, temporal_patch_size=2, merge_size=2)


def randomise(model, std=0.12):
    """Re-draw every parameter so image features are far from zero and reach the logits
    (std about 1/sqrt(64): wider weights make attention scores so large that SDPA and
    eager softmax differ by more than the tests' 1e-5)."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                continue
            p.normal_(0.0, std)


def build(path):
    import tl_vlm.adapters  # noqa: F401  (image-only processor without torchvision)
    from transformers import Glm4vConfig, Glm4vForConditionalGeneration, Glm4vProcessor

    tok = tokenizer()
    text = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                # M-RoPE on half of head_dim 16: 8 dims = 4 frequencies, T 2 / H 1 / W 1
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                 "partial_rotary_factor": 0.5, "mrope_section": [2, 1, 1]},
                pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id)
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=64,
                  image_size=16, patch_size=4, spatial_merge_size=2, temporal_patch_size=2)
    cfg = Glm4vConfig(text_config=text, vision_config=vision, tie_word_embeddings=False,
                      **token_ids(tok))
    model = Glm4vForConditionalGeneration(cfg).eval()
    randomise(model)
    model.save_pretrained(path)
    Glm4vProcessor(image_processor=image_processor(), tokenizer=tok).save_pretrained(path)


FULL = "<|begin_of_image|><|image|><|end_of_image|>"

SPEC = TinySpec(
    family="glm4v",
    build=build,
    hf_class="Glm4vForConditionalGeneration",
    # The second prompt writes one full placeholder and one bare <|image|>.
    prompts=["what is this", f"{FULL} a cat <|image|> describe the image"],
    images=[image(0, (16, 24)), [image(1, (16, 16)), image(2, (24, 16))]],
    other_images=[image(10, (16, 24)), [image(11, (16, 16)), image(12, (24, 16))]],
)


# -- real size ---------------------------------------------------------------------------
def released() -> Released:
    from transformers import Glm4vConfig, Glm4vImageProcessorPil, Glm4vProcessor

    tok = tokenizer()
    # zai-org/GLM-4.1V-9B-Thinking preprocessor_config.json (Glm4vImageProcessor): size
    # {"shortest_edge": 12544, "longest_edge": 9633792}, patch_size 14,
    # temporal_patch_size 2, merge_size 2, CLIP image_mean/std (the class default).
    image_processor = Glm4vImageProcessorPil(
        size={"shortest_edge": 12544, "longest_edge": 9633792}, patch_size=14,
        temporal_patch_size=2, merge_size=2)
    processor = Glm4vProcessor(image_processor=image_processor, tokenizer=tok)
    # config.json: vision patch_size 14, spatial_merge_size 2 (the class defaults).
    config = Glm4vConfig(text_config=dict(vocab_size=len(tok)),
                         vision_config=dict(patch_size=14, spatial_merge_size=2),
                         **token_ids(tok))
    return Released(processor, config)


# smart_resize(2 frames, h, w, factor=28, min_pixels=12544, max_pixels=9633792): each side
# rounded to the nearest multiple of 28 px; if 2*h'*w' > max_pixels both sides shrink by
# beta = sqrt(2*h*w / max) and floor to 28; if 2*h'*w' < min_pixels both grow by
# beta = sqrt(min / (2*h*w)) and ceil to 28. One text-side token per 28x28 px.
REAL_SIZE = {
    PHOTO: Expected(((17, 23),)),     # round(17.14) x round(22.86) -> 476x644 px
    WIDE: Expected(((39, 69),)),      # round(38.57) x round(68.57) -> 1092x1932 px, in range
    TALL: Expected(((69, 39),)),
    (448, 448): Expected(((16, 16),)),
    # 40x40 -> 28x28 px, 2*28*28 = 1568 < 12544: beta = sqrt(12544/3200) = 1.98,
    # ceil(40*1.98/28) = ceil(2.83) = 3 -> 84x84 px
    SMALL: Expected(((3, 3),)),
    # 2240x2240 -> 2*2240^2 = 10035200 > 9633792: beta = 1.0206, floor(2240/1.0206/28) =
    # floor(78.38) = 78 -> 2184x2184 px
    (2240, 2240): Expected(((78, 78),)),
}
