"""Tiny Qwen2-VL: 4px patches, 2x2 merge (8px per text-side token), M-RoPE decoder (GQA).

Images are multiples of 8 px so ``smart_resize`` keeps them: 16x24 -> a 2x3 grid,
16x16 -> 2x2, 24x16 -> 3x2 (rows x cols of ``<|image_pad|>``).
"""

from typing import Optional, Sequence

from tests.tiny import TinySpec, image, make_tokenizer

SPECIALS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]


def tokenizer():
    return make_tokenizer(SPECIALS)


def image_processor(max_pixels: int = 576):
    from transformers import Qwen2VLImageProcessorPil

    # min/max pixels keep every test image at its own (already 8-aligned) size.
    return Qwen2VLImageProcessorPil(min_pixels=64, max_pixels=max_pixels, patch_size=4,
                                    temporal_patch_size=2, merge_size=2)


def text_config(tok, layers: int = 2, hidden: int = 32, heads: int = 4, kv_heads: int = 2,
                mlp: int = 64, vocab: Optional[int] = None,
                mrope_section: Sequence[int] = (2, 1, 1), max_positions: int = 256):
    """The decoder config (tiny by default; the benchmarks size it up to Qwen2-VL-7B's
    3584 / 28 heads / 4 kv heads / 18944 / vocabulary 152064 / mrope [16, 24, 24])."""
    return dict(vocab_size=max(len(tok), vocab or 0), hidden_size=hidden, intermediate_size=mlp,
                num_hidden_layers=layers, num_attention_heads=heads,
                num_key_value_heads=kv_heads, max_position_embeddings=max_positions,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                 "mrope_section": list(mrope_section)},  # sums to head_dim / 2
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


def build(path, max_pixels: int = 576, randomise_weights: bool = True, **text_size):
    """Write the tiny Qwen2-VL. The benchmarks size the decoder up (``text_size``: the
    keywords of :func:`text_config`) and allow bigger images (``max_pixels``; 8 px per
    text-side token), keeping HF's small-std initialisation (``randomise_weights=False``:
    std-0.2 weights overflow at real width)."""
    import tl_vlm.adapters.qwen2_vl  # noqa: F401  (image-only processor without torchvision)
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor

    tok = tokenizer()
    hidden = text_size.get("hidden", 32)
    cfg = Qwen2VLConfig(
        text_config=text_config(tok, **text_size),
        # hidden_size is the merger's output: the decoder width.
        vision_config=dict(depth=2, embed_dim=32, hidden_size=hidden, num_heads=4, mlp_ratio=2,
                           patch_size=4, spatial_merge_size=2, temporal_patch_size=2),
        **token_ids(tok),
    )
    model = Qwen2VLForConditionalGeneration(cfg).eval()
    if randomise_weights:
        randomise(model)
    model.save_pretrained(path)
    Qwen2VLProcessor(image_processor=image_processor(max_pixels), tokenizer=tok).save_pretrained(path)


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
