"""Tiny Pixtral: Pixtral tower (4px patches, longest edge 16) + Mistral, as a LLaVA checkpoint.

Images of different shapes give different grids: 16x12 (h x w) -> 4x3 patches, 8x16 ->
2x4, 12x12 -> 3x3. The processor writes ``[IMG]`` x cols + ``[IMG_BREAK]`` per row, the
last row ending in ``[IMG_END]``.
"""

from tests.tiny import TinySpec, image, make_tokenizer

SPECIALS = ["[IMG]", "[IMG_BREAK]", "[IMG_END]"]


def tokenizer():
    return make_tokenizer(SPECIALS)


def build(path):
    import tl_vlm.adapters.pixtral  # noqa: F401  (PixtralProcessor without torchvision)
    from transformers import (LlavaConfig, LlavaForConditionalGeneration, MistralConfig,
                              PixtralImageProcessorPil, PixtralVisionConfig)
    from transformers.models.pixtral import PixtralProcessor

    tok = tokenizer()
    cfg = LlavaConfig(
        text_config=MistralConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, head_dim=8,
                                  max_position_embeddings=256, pad_token_id=tok.pad_token_id),
        vision_config=PixtralVisionConfig(hidden_size=32, intermediate_size=64,
                                          num_hidden_layers=2, num_attention_heads=4,
                                          image_size=16, patch_size=4, head_dim=8),
        image_token_id=tok.convert_tokens_to_ids("[IMG]"),
        projector_hidden_act="gelu", vision_feature_layer=-1,
        vision_feature_select_strategy="full", multimodal_projector_bias=True,
    )
    cfg.architectures = ["LlavaForConditionalGeneration"]
    LlavaForConditionalGeneration(cfg).eval().save_pretrained(path)
    processor = PixtralProcessor(
        image_processor=PixtralImageProcessorPil(size={"longest_edge": 16},
                                                 patch_size={"height": 4, "width": 4}),
        tokenizer=tok, patch_size=4, spatial_merge_size=1)
    processor.save_pretrained(path)


SPEC = TinySpec(
    family="pixtral",
    build=build,
    hf_class="LlavaForConditionalGeneration",
    prompts=["what is this", "[IMG] a cat [IMG] describe the image a dog"],
    images=[image(0, (16, 12)), [image(1, (8, 16)), image(2, (12, 12))]],
    other_images=[image(10, (16, 12)), [image(11, (8, 16)), image(12, (12, 12))]],
)
