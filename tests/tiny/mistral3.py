"""Tiny Mistral 3: Pixtral tower (4 px patches), 2x2 patch merger, Mistral text decoder.

The processor resizes to longest edge <= 32 px with sides multiples of 8 px (4 px patches
x merge 2), so one ``[IMG]`` per 8x8 px: 32x24 (h x w) -> 4x3, 16x32 -> 2x4, 24x24 ->
3x3. Each row of ``[IMG]`` ends in ``[IMG_BREAK]``, the last row in ``[IMG_END]``.

Real size: ``released()`` is ``PixtralProcessor`` at Mistral Small 3.1's settings
(14 px patches, merge 2: 28 px per token, longest edge 1540 px).
"""

from tests.real_size import PHOTO, SMALL, TALL, WIDE, Expected, Released
from tests.tiny import TinySpec, image, make_tokenizer

SPECIALS = ["[IMG]", "[IMG_BREAK]", "[IMG_END]"]


def tokenizer():
    return make_tokenizer(SPECIALS)


def build(path):
    import torch

    import tl_vlm.adapters.mistral3  # noqa: F401  (PixtralProcessor without torchvision)
    from transformers import (MistralConfig, Mistral3Config, Mistral3ForConditionalGeneration,
                              PixtralImageProcessorPil, PixtralVisionConfig)
    from transformers.models.pixtral import PixtralProcessor

    tok = tokenizer()
    cfg = Mistral3Config(
        text_config=MistralConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, head_dim=8,
                                  max_position_embeddings=256, pad_token_id=tok.pad_token_id,
                                  rope_theta=1e9),
        vision_config=PixtralVisionConfig(hidden_size=32, intermediate_size=64,
                                          num_hidden_layers=2, num_attention_heads=4,
                                          image_size=32, patch_size=4, head_dim=8),
        image_token_index=tok.convert_tokens_to_ids("[IMG]"),
        spatial_merge_size=2, vision_feature_layer=-1, multimodal_projector_bias=False,
        # Mistral Small 3.1 has a separate output matrix (``output.weight`` in
        # convert_mistral3_weights_to_hf.py); the config class default ties them.
        tie_word_embeddings=False,
    )
    cfg.architectures = ["Mistral3ForConditionalGeneration"]
    model = Mistral3ForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # RMSNorm weights start at 1; make them matter
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.add_(0.1 * torch.randn_like(param))
    model.save_pretrained(path)
    processor = PixtralProcessor(
        image_processor=PixtralImageProcessorPil(size={"longest_edge": 32},
                                                 patch_size={"height": 4, "width": 4}),
        tokenizer=tok, patch_size=4, spatial_merge_size=2)
    processor.save_pretrained(path)


SPEC = TinySpec(
    family="mistral3",
    build=build,
    hf_class="Mistral3ForConditionalGeneration",
    prompts=["what is this", "[IMG] a cat [IMG] describe the image a dog"],
    images=[image(0, (32, 24)), [image(1, (16, 32)), image(2, (24, 24))]],
    other_images=[image(10, (32, 24)), [image(11, (16, 32)), image(12, (24, 24))]],
)


def released() -> Released:
    from transformers import (MistralConfig, Mistral3Config, PixtralImageProcessorPil,
                              PixtralVisionConfig)
    from transformers.models.pixtral import PixtralProcessor

    tok = tokenizer()
    # mistralai/Mistral-Small-3.1-24B-Instruct-2503 preprocessor_config.json: longest_edge
    # 1540, patch_size 14; processor_config.json: patch_size 14, spatial_merge_size 2 (as
    # convert_mistral3_weights_to_hf.py writes them from params.json: max_image_size
    # 1540). Mistral-Small-3.2-24B-Instruct-2506 has the same vision settings.
    processor = PixtralProcessor(
        image_processor=PixtralImageProcessorPil(size={"longest_edge": 1540},
                                                 patch_size={"height": 14, "width": 14}),
        tokenizer=tok, patch_size=14, spatial_merge_size=2)
    # Mistral3Config's defaults are Mistral Small 3.1's (Pixtral tower at 1540 px, 14 px
    # patches, spatial_merge_size 2); only the vocabulary is the tiny tokenizer's.
    config = Mistral3Config(text_config=MistralConfig(vocab_size=len(tok)),
                            vision_config=PixtralVisionConfig(image_size=1540, patch_size=14),
                            image_token_index=tok.convert_tokens_to_ids("[IMG]"),
                            spatial_merge_size=2)
    return Released(processor, config)


# PixtralImageProcessor with patch 28 (14 px x merge 2, PixtralProcessor._process_images):
# ratio = max(h/1540, w/1540); if ratio > 1, h, w = floor(h/ratio), floor(w/ratio); then
# each side up to a multiple of 28: tokens = (side - 1) // 28 + 1. [IMG_BREAK] ends every
# row but the last, which [IMG_END] ends: breaks = rows - 1.
REAL_SIZE = {
    (1540, 1540): Expected(((55, 55),), breaks=54),  # no resize; 1540 / 28 = 55
    PHOTO: Expected(((18, 23),), breaks=17),          # 480x640, no resize: 479//28+1 = 18, 639//28+1 = 23
    # 1080x1920: ratio 1920/1540; h = floor(1080*1540/1920) = floor(866.25) = 866 -> 865//28+1 = 31,
    # w = 1540 (or 1539 by rounding) -> 55
    WIDE: Expected(((31, 55),), breaks=30),
    TALL: Expected(((55, 31),), breaks=54),
    SMALL: Expected(((2, 2),), breaks=1),             # 40x40: 39//28+1 = 2
}
