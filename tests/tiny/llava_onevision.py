"""Tiny LLaVA-OneVision: SigLIP tower (16px tiles, 4px patches -> 4x4 base grid) + Qwen2.

``image_grid_pinpoints`` [[16,16],[16,32],[32,16]]: a lone image of a prompt is split
into anyres tiles (base 4x4, then an unpadded tile grid with a newline feature per row);
in a prompt with two images each is base 4x4 + one newline. Every feature is ``<image>``.
"""

from tests.tiny import TinySpec, image, make_tokenizer

PINPOINTS = [[16, 16], [16, 32], [32, 16]]


def tokenizer():
    return make_tokenizer(["<image>", "<video>"],
                          extra_special_tokens={"image_token": "<image>", "video_token": "<video>"})


def build(path, vision_aspect_ratio="anyres_max_9"):
    from transformers import (LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration,
                              LlavaOnevisionImageProcessorPil, LlavaOnevisionProcessor,
                              Qwen2Config, SiglipVisionConfig)

    tok = tokenizer()
    cfg = LlavaOnevisionConfig(
        text_config=Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                max_position_embeddings=256, pad_token_id=tok.pad_token_id),
        vision_config=SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, image_size=16, patch_size=4),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        video_token_index=tok.convert_tokens_to_ids("<video>"),
        vision_feature_layer=-1, vision_feature_select_strategy="full",
        image_grid_pinpoints=PINPOINTS, vision_aspect_ratio=vision_aspect_ratio,
    )
    cfg.architectures = ["LlavaOnevisionForConditionalGeneration"]
    LlavaOnevisionForConditionalGeneration(cfg).eval().save_pretrained(path)
    processor = LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessorPil(
            size={"height": 16, "width": 16}, image_grid_pinpoints=PINPOINTS),
        tokenizer=tok, num_image_tokens=16, vision_feature_select_strategy="full",
        vision_aspect_ratio=vision_aspect_ratio)
    processor.save_pretrained(path)


SPEC = TinySpec(
    family="llava_onevision",
    build=build,
    hf_class="LlavaOnevisionForConditionalGeneration",
    prompts=["what is this", "<image> a cat <image> describe the image a dog"],
    images=[image(0), [image(1), image(2, (30, 18))]],
    other_images=[image(10), [image(11), image(12, (30, 18))]],
)
