"""Tiny SmolVLM2: a 2-layer SmolVLM vision tower (24 px crops, 4 px patches: 6x6,
pixel-shuffled by 3 to 2x2 = 4 ``<image>`` per crop) + a 2-layer Llama (SmolLM2-shaped).

The processor resizes the longest edge to 48 px and cuts 24 px crops: a 20x24 (h x w)
picture becomes 48x48 px (2x2 crops), a 12x30 one 24x48 px (1x2 crops), a 30x18 one
48x48 px (2x2 crops). Same tokens as tests/tiny/idefics3.py.
"""

from tests.real_size import PHOTO, Released, SMALL, TALL, WIDE
from tests.tiny import TinySpec, image
from tests.tiny.idefics3 import IMG, configs, split, tokenizer  # noqa: F401  (tokenizer: SPEC)


def build(path):
    import tl_vlm.adapters  # noqa: F401  (SmolVLMProcessor without torchvision / num2words)
    from transformers import (SmolVLMConfig, SmolVLMForConditionalGeneration,
                              SmolVLMImageProcessorPil, SmolVLMProcessor, SmolVLMVisionConfig)

    tok = tokenizer()
    cfg = configs(tok, SmolVLMVisionConfig, SmolVLMConfig, image_size=24, patch_size=4,
                  scale_factor=3)
    SmolVLMForConditionalGeneration(cfg).eval().save_pretrained(path)
    processor = SmolVLMProcessor(
        image_processor=SmolVLMImageProcessorPil(size={"longest_edge": 48},
                                                 max_image_size={"longest_edge": 24}),
        tokenizer=tok, image_seq_len=4)
    processor.save_pretrained(path)


SPEC = TinySpec(
    family="smolvlm",
    build=build,
    hf_class="SmolVLMForConditionalGeneration",
    prompts=["what is this", "<image> a cat <image> describe the image a dog"],
    images=[image(0), [image(1, (12, 30)), image(2, (30, 18))]],
    other_images=[image(10), [image(11, (12, 30)), image(12, (30, 18))]],
)


# -- real size ---------------------------------------------------------------------------
def released() -> Released:
    import tl_vlm.adapters  # noqa: F401  (SmolVLMProcessor without torchvision / num2words)
    from transformers import (LlamaConfig, SmolVLMConfig, SmolVLMImageProcessorPil,
                              SmolVLMProcessor, SmolVLMVisionConfig)

    tok = tokenizer()
    # HuggingFaceTB/SmolVLM2-256M-Video-Instruct preprocessor_config.json: size longest_edge
    # 2048, max_image_size longest_edge 512, do_image_splitting true, resample 1 (LANCZOS),
    # mean/std 0.5: the SmolVLMImageProcessor defaults. processor_config.json: image_seq_len
    # 64 = (512 / 16)^2 / 4^2.
    image_processor = SmolVLMImageProcessorPil(size={"longest_edge": 2048},
                                               max_image_size={"longest_edge": 512})
    processor = SmolVLMProcessor(image_processor=image_processor, tokenizer=tok,
                                 image_seq_len=64)
    # config.json: SigLIP-like tower at 512 px with 16 px patches, scale_factor 4.
    config = SmolVLMConfig(text_config=LlamaConfig(vocab_size=len(tok)).to_dict(),
                           vision_config=SmolVLMVisionConfig(image_size=512,
                                                             patch_size=16).to_dict(),
                           scale_factor=4, image_token_id=tok.convert_tokens_to_ids(IMG))
    return Released(processor, config)


# The longest edge is resized to 2048 px (the other to int(2048 / aspect), +1 if odd), each
# side is then rounded up to a multiple of 512 px and cut into 512 px crops; 8x8 features
# per crop and for the global view (512 / 16 = 32 patches, pixel-shuffled by 4).
REAL_SIZE = {
    (512, 512): split(4, 4, 8),    # 2048x2048 px: 4x4 crops
    PHOTO: split(3, 4, 8),         # 480x640 -> 1536x2048 px (1536 = 3 x 512): 3x4 crops
    WIDE: split(3, 4, 8),          # 1080x1920 -> 1152x2048 -> 1536x2048: 3x4 crops
    TALL: split(4, 3, 8),          # 1920x1080 -> 2048x1152 -> 2048x1536: 4x3 crops
    SMALL: split(4, 4, 8),         # 40x40 -> 2048x2048 px: 4x4 crops
}
