"""Tiny Qwen2-VL: 4px patches, 2x2 merge (8px per text-side token), M-RoPE decoder (GQA).

Images are multiples of 8 px so ``smart_resize`` keeps them: 16x24 -> a 2x3 grid,
16x16 -> 2x2, 24x16 -> 3x2 (rows x cols of ``<|image_pad|>``).
"""

from tests.tiny import TinySpec, image, make_tokenizer

SPECIALS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]


def tokenizer():
    return make_tokenizer(SPECIALS)


def image_processor():
    from transformers import Qwen2VLImageProcessorPil

    # min/max pixels keep every test image at its own (already 8-aligned) size.
    return Qwen2VLImageProcessorPil(min_pixels=64, max_pixels=576, patch_size=4,
                                    temporal_patch_size=2, merge_size=2)


def text_config(tok):
    return dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                 "mrope_section": [2, 1, 1]},  # sums to head_dim / 2
                pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id)


def token_ids(tok):
    ids = tok.convert_tokens_to_ids
    return dict(image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
                vision_start_token_id=ids("<|vision_start|>"),
                vision_end_token_id=ids("<|vision_end|>"))


def randomise(model):
    """Re-draw every parameter so image features are far from zero and reach the logits."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln_" in name:
                continue
            p.normal_(0.0, 0.2)


def build(path):
    import tl_vlm.adapters.qwen2_vl  # noqa: F401  (image-only processor without torchvision)
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor

    tok = tokenizer()
    cfg = Qwen2VLConfig(
        text_config=text_config(tok),
        vision_config=dict(depth=2, embed_dim=32, hidden_size=32, num_heads=4, mlp_ratio=2,
                           patch_size=4, spatial_merge_size=2, temporal_patch_size=2),
        **token_ids(tok),
    )
    model = Qwen2VLForConditionalGeneration(cfg).eval()
    randomise(model)
    model.save_pretrained(path)
    Qwen2VLProcessor(image_processor=image_processor(), tokenizer=tok).save_pretrained(path)


SPEC = TinySpec(
    family="qwen2_vl",
    build=build,
    hf_class="Qwen2VLForConditionalGeneration",
    # The second prompt writes one full placeholder and one bare <|image_pad|>.
    prompts=["what is this",
             "<|vision_start|><|image_pad|><|vision_end|> a cat <|image_pad|> describe the image"],
    images=[image(0, (16, 24)), [image(1, (16, 16)), image(2, (24, 16))]],
    other_images=[image(10, (16, 24)), [image(11, (16, 16)), image(12, (24, 16))]],
)
