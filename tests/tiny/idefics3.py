"""Tiny Idefics3: a 2-layer Idefics3 vision tower (16 px crops, 4 px patches: 4x4,
pixel-shuffled by 2 to 2x2 = 4 ``<image>`` per crop) + a 2-layer Llama.

The processor resizes the longest edge to 32 px and cuts 16 px crops: a 20x24 (h x w)
picture becomes 32x32 px (2x2 crops), a 12x30 one 16x32 px (1x2 crops), a 30x18 one
32x32 px (2x2 crops). ``"\\n"`` is a token of the tiny vocabulary, as in the real ones.
"""

from tests.real_size import Expected, PHOTO, Released, SMALL, TALL, WIDE
from tests.tiny import TinySpec, image, make_tokenizer

FAKE, IMG, GLOBAL, EOU = "<fake_token_around_image>", "<image>", "<global-img>", "<end_of_utterance>"
CROPS = [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]


def tokenizer():
    """The released strings (Idefics3-8B-Llama3 / SmolVLM tokenizers), ``"\\n"`` included."""
    return make_tokenizer([FAKE, IMG, GLOBAL, EOU, *CROPS, "\n"],
                          extra_special_tokens={"image_token": IMG, "fake_image_token": FAKE,
                                                "global_image_token": GLOBAL,
                                                "end_of_utterance_token": EOU})


def configs(tok, vision_config_cls, config_cls, *, image_size=16, patch_size=4, scale_factor=2,
            hidden=32):
    """A tiny decoder and tower (shared with tests/tiny/smolvlm.py)."""
    from transformers import LlamaConfig

    text = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=64,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=512, pad_token_id=tok.pad_token_id,
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    vision = vision_config_cls(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, image_size=image_size,
                               patch_size=patch_size)
    return config_cls(text_config=text.to_dict(), vision_config=vision.to_dict(),
                      scale_factor=scale_factor, image_token_id=tok.convert_tokens_to_ids(IMG),
                      pad_token_id=tok.pad_token_id)


def build(path):
    from transformers import (Idefics3Config, Idefics3ForConditionalGeneration,
                              Idefics3ImageProcessorPil, Idefics3Processor, Idefics3VisionConfig)

    tok = tokenizer()
    cfg = configs(tok, Idefics3VisionConfig, Idefics3Config)
    Idefics3ForConditionalGeneration(cfg).eval().save_pretrained(path)
    processor = Idefics3Processor(
        image_processor=Idefics3ImageProcessorPil(size={"longest_edge": 32},
                                                  max_image_size={"longest_edge": 16}),
        tokenizer=tok, image_seq_len=4)
    processor.save_pretrained(path)


SPEC = TinySpec(
    family="idefics3",
    build=build,
    hf_class="Idefics3ForConditionalGeneration",
    prompts=["what is this", "<image> a cat <image> describe the image a dog"],
    images=[image(0), [image(1, (12, 30)), image(2, (30, 18))]],
    other_images=[image(10), [image(11, (12, 30)), image(12, (30, 18))]],
)


# -- real size ---------------------------------------------------------------------------
def released() -> Released:
    from transformers import (Idefics3Config, Idefics3ImageProcessorPil, Idefics3Processor,
                              Idefics3VisionConfig, LlamaConfig)

    tok = tokenizer()
    # HuggingFaceM4/Idefics3-8B-Llama3 preprocessor_config.json: size longest_edge 1456,
    # do_image_splitting true, resample 1 (LANCZOS), mean/std 0.5; max_image_size is not
    # set there, so the class default 364 applies (= the values of Idefics3ImageProcessor).
    image_processor = Idefics3ImageProcessorPil(size={"longest_edge": 1456},
                                                max_image_size={"longest_edge": 364})
    # processor_config.json: image_seq_len 169 = (364 / 14)^2 / 2^2 (the class default).
    processor = Idefics3Processor(image_processor=image_processor, tokenizer=tok,
                                  image_seq_len=169)
    # config.json: SigLIP tower at 364 px with 14 px patches, scale_factor 2 (defaults).
    config = Idefics3Config(text_config=LlamaConfig(vocab_size=len(tok)).to_dict(),
                            vision_config=Idefics3VisionConfig(image_size=364,
                                                               patch_size=14).to_dict(),
                            scale_factor=2, image_token_id=tok.convert_tokens_to_ids(IMG))
    return Released(processor, config)


def split(rows: int, cols: int, side: int, newline_tokens: int = 1) -> Expected:
    """A picture cut into ``rows x cols`` crops of ``side x side`` features, then the
    global view (one more ``side x side`` block); with the tiny tokenizer every ``"\\n"``
    is one token: one after each crop row and one before the global view."""
    return Expected(((side, side),) * (rows * cols + 1),
                    breaks=(rows + 1) * newline_tokens if rows else 0)


# The longest edge is resized to 1456 px (the other to int(1456 / aspect), +1 if odd),
# each side is then rounded up to a multiple of 364 px (the short side recomputed from the
# long one first) and cut into 364 px crops; 13x13 features per crop and for the global
# view (364 / 14 = 26 patches, pixel-shuffled by 2).
REAL_SIZE = {
    (364, 364): split(4, 4, 13),   # 1456x1456 px: upscaled too, 4x4 crops
    PHOTO: split(3, 4, 13),        # 480x640 -> 1092x1456 px (1092 = 3 x 364): 3x4 crops
    WIDE: split(3, 4, 13),         # 1080x1920 -> 820x1456 (819 -> even 820) -> 1092x1456
    TALL: split(4, 3, 13),         # 1920x1080 -> 1456x820 -> 1456x1092: 4x3 crops
    SMALL: split(4, 4, 13),        # 40x40 -> 1456x1456 px: 4x4 crops
}
