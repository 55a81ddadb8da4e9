"""Tiny Qwen3-VL-MoE: tiny Qwen3-VL's tokenizer, processor, images and tower (DeepStack
into both decoder layers), with a sparse-MoE MLP (4 experts, top 2) in decoder layer 0 and
a dense MLP in layer 1 (``mlp_only_layers=[1]``), so both MLP kinds are bridged.

Real size: the processor of Qwen/Qwen3-VL-30B-A3B-Instruct is Qwen3-VL's
(``tests/tiny/qwen3_vl.py``): the same table.
"""

from tests.real_size import PHOTO, SMALL, TALL, WIDE, Expected, Released
from tests.tiny import TinySpec, image

# tests/tiny/qwen3_vl.py is imported inside the functions only: importing this module
# while tests.real_size (which imports every tiny module) is half-imported must not
# need the other half-imported module's names.


# Weights drawn from this seed: with the zoo's global seed 0 the tiny model's first
# generated token is EOS, which ends generate() after one step.
SEED = 1


def build(path, seed=SEED):
    import tl_vlm.adapters  # noqa: F401  (image-only processor without torchvision)
    from transformers import (Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration,
                              Qwen3VLProcessor)

    from tests.tiny.qwen3_vl import (VISION, image_processor, randomise, text_config,
                                     token_ids, tokenizer)

    tok = tokenizer()
    text = text_config(tok, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                       decoder_sparse_step=1, mlp_only_layers=[1])
    cfg = Qwen3VLMoeConfig(text_config=text, vision_config=VISION, tie_word_embeddings=False,
                           **token_ids(tok))
    model = Qwen3VLMoeForConditionalGeneration(cfg).eval()
    randomise(model, seed)   # the router starts at zero: re-drawn with the rest
    model.save_pretrained(path)
    Qwen3VLProcessor(image_processor=image_processor(), tokenizer=tok).save_pretrained(path)


SPEC = TinySpec(
    family="qwen3_vl_moe",
    build=build,
    hf_class="Qwen3VLMoeForConditionalGeneration",
    # tiny Qwen3-VL's prompts and pictures
    prompts=["what is this",
             "<|vision_start|><|image_pad|><|vision_end|> a cat <|image_pad|> describe the image"],
    images=[image(0, (16, 24)), [image(1, (16, 16)), image(2, (24, 16))]],
    other_images=[image(10, (16, 24)), [image(11, (16, 16)), image(12, (24, 16))]],
    # DeepStack adds image features to the output of decoder layers 0 and 1.
    image_entry_hooks=("blocks.0.deepstack.hook_out", "blocks.1.deepstack.hook_out"),
)


# -- real size ---------------------------------------------------------------------------
def released() -> Released:
    from transformers import Qwen2VLImageProcessorPil, Qwen3VLMoeConfig, Qwen3VLProcessor

    from tests.tiny.qwen3_vl import token_ids, tokenizer

    tok = tokenizer()
    # Qwen/Qwen3-VL-30B-A3B-Instruct preprocessor_config.json: as the dense Qwen3-VL
    # checkpoints' (Qwen2VLImageProcessorFast, patch_size 16, temporal_patch_size 2,
    # merge_size 2, image_mean/std 0.5, size {"shortest_edge": 65536,
    # "longest_edge": 16777216}).
    image_processor = Qwen2VLImageProcessorPil(
        size={"shortest_edge": 65536, "longest_edge": 16777216}, patch_size=16,
        temporal_patch_size=2, merge_size=2, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    processor = Qwen3VLProcessor(image_processor=image_processor, tokenizer=tok)
    # config.json: vision patch_size 16, spatial_merge_size 2 (the class defaults).
    config = Qwen3VLMoeConfig(text_config=dict(vocab_size=len(tok)),
                              vision_config=dict(patch_size=16, spatial_merge_size=2),
                              **token_ids(tok))
    return Released(processor, config)


# The same processor and settings as Qwen3-VL (derivations in tests/tiny/qwen3_vl.py): each
# side to the nearest multiple of 32 px (16 px patches merged 2x2), the area kept in
# [65536, 16777216] px (shrunk with floor, grown with ceil); one token per 32x32 px.
REAL_SIZE = {
    PHOTO: Expected(((15, 20),)),     # 480x640 px kept
    WIDE: Expected(((34, 60),)),      # 1080 -> 1088 (33.75 rounds to 34), 1920 kept
    TALL: Expected(((60, 34),)),
    (512, 512): Expected(((16, 16),)),
    SMALL: Expected(((8, 8),)),       # 1024 < 65536 px: x6.4, ceil -> 256x256 px
}
