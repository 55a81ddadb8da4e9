"""Tiny Qwen2.5-VL: like tiny Qwen2-VL (same tokenizer, processor and images), with
Qwen2.5-VL's windowed tower: RMS norms, gated MLP, 2x2-token windows in block 0 and
full attention in block 1 (a 2x3 grid spans two windows).
"""

from tests.tiny import TinySpec, image
from tests.tiny.qwen2_vl import image_processor, randomise, text_config, token_ids, tokenizer


def build(path):
    import tl_vlm.adapters.qwen2_vl  # noqa: F401  (image-only processor without torchvision)
    from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration,
                              Qwen2_5_VLProcessor)

    tok = tokenizer()
    cfg = Qwen2_5_VLConfig(
        text_config=text_config(tok),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4,
                           out_hidden_size=32, patch_size=4, spatial_merge_size=2,
                           temporal_patch_size=2, window_size=16,  # 16 px = 2x2 merged tokens
                           fullatt_block_indexes=[1]),
        **token_ids(tok),
    )
    model = Qwen2_5_VLForConditionalGeneration(cfg).eval()
    randomise(model)
    model.save_pretrained(path)
    Qwen2_5_VLProcessor(image_processor=image_processor(), tokenizer=tok).save_pretrained(path)


SPEC = TinySpec(
    family="qwen2_5_vl",
    build=build,
    hf_class="Qwen2_5_VLForConditionalGeneration",
    prompts=["what is this",
             "<|vision_start|><|image_pad|><|vision_end|> a cat <|image_pad|> describe the image"],
    images=[image(0, (16, 24)), [image(1, (16, 16)), image(2, (24, 16))]],
    other_images=[image(10, (16, 24)), [image(11, (16, 16)), image(12, (24, 16))]],
)
