"""Tiny LLaVA-1.5: CLIP tower (16px images, 4px patches -> 4x4 grid) + Llama (GQA)."""

from tests.tiny import TinySpec, image, make_tokenizer


SPECIALS = ["<image>"]


def tokenizer(factory=make_tokenizer):
    """The tiny vocabulary; ``factory`` builds another kind (e.g. SentencePiece-style)."""
    return factory(SPECIALS, extra_special_tokens={"image_token": "<image>"})


def build(path, tokenizer_factory=make_tokenizer):
    """Save the tiny LLaVA; ``tokenizer_factory(specials, **kwargs)`` picks the tokenizer."""
    from transformers import (CLIPImageProcessorPil, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor)

    tok = tokenizer(tokenizer_factory)
    cfg = LlavaConfig(
        text_config=LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                max_position_embeddings=256, pad_token_id=tok.pad_token_id),
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, image_size=16, patch_size=4,
                                       projection_dim=32),
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-1, vision_feature_select_strategy="default",
    )
    LlavaForConditionalGeneration(cfg).eval().save_pretrained(path)
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(size={"shortest_edge": 16},
                                              crop_size={"height": 16, "width": 16}),
        tokenizer=tok, patch_size=4, vision_feature_select_strategy="default",
        num_additional_image_tokens=1)
    processor.save_pretrained(path)


SPEC = TinySpec(
    family="llava",
    build=build,
    hf_class="LlavaForConditionalGeneration",
    prompts=["what is this", "<image> a cat <image> describe the image a dog"],
    images=[image(0), [image(1), image(2, (30, 18))]],
    other_images=[image(10), [image(11), image(12, (30, 18))]],
)
