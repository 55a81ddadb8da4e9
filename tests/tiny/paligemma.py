"""Tiny PaliGemma: SigLIP tower (16px images, 4px patches -> a 4x4 grid = 16 ``<image>``
tokens per image, no pooling head), a linear projector, and a 2-layer Gemma text model.

``build(path)`` makes PaliGemma 1 (``GemmaModel``: one KV head as released, no
soft-capping), the family-wide tests' model; ``build(path, version=2)`` makes PaliGemma 2
(``Gemma2Model``: post-norms, one sliding (window 4) and one full layer, attention
soft-cap 50 and final-logit soft-cap 30, as ``convert_paligemma2_weights_to_hf.py``
takes them from gemma-2-2b-it), checked in ``tests/test_positions_paligemma.py``.

Gemma's ``(1 + w)`` RMSNorms start at zero; they are randomised so the bridge's norms
are checked with non-trivial weights. The tokenizer holds ``"\\n"`` as a token, as
Gemma's does: the processor closes every prompt with it.
"""

from tests.real_size import PHOTO, SMALL, TALL, WIDE, Released, fixed
from tests.tiny import TinySpec, image, make_tokenizer

IMG = "<image>"


def tokenizer():
    from tokenizers import AddedToken

    tok = make_tokenizer([IMG], bos="<bos>", eos="<eos>",
                         extra_special_tokens={"image_token": IMG})
    tok.add_tokens([AddedToken("\n", normalized=False, special=False)])
    return tok


def processor(image_size: int = 16, patch_size: int = 4):
    from transformers import PaliGemmaProcessor, SiglipImageProcessorPil

    side = image_size // patch_size
    image_processor = SiglipImageProcessorPil(size={"height": image_size, "width": image_size},
                                              image_seq_length=side * side)
    # The processor adds the 1024 <locXXXX> and 128 <segXXX> tokens to the tokenizer.
    return PaliGemmaProcessor(image_processor=image_processor, tokenizer=tokenizer())


def build(path, version: int = 1):
    import torch
    from transformers import (Gemma2Config, GemmaConfig, PaliGemmaConfig,
                              PaliGemmaForConditionalGeneration, SiglipVisionConfig)

    proc = processor()
    tok = proc.tokenizer
    common = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, head_dim=8, max_position_embeddings=256,
                  pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                  eos_token_id=tok.eos_token_id)
    if version == 1:
        text = GemmaConfig(num_key_value_heads=1, **common)
    else:
        text = Gemma2Config(num_key_value_heads=2, query_pre_attn_scalar=8, sliding_window=4,
                            layer_types=["sliding_attention", "full_attention"],
                            attn_logit_softcapping=50.0, final_logit_softcapping=30.0, **common)
    cfg = PaliGemmaConfig(
        text_config=text.to_dict(),
        vision_config=SiglipVisionConfig(hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4,
                                         image_size=16, patch_size=4,
                                         vision_use_head=False).to_dict(),
        image_token_index=tok.convert_tokens_to_ids(IMG), projection_dim=32, hidden_size=32,
        vocab_size=len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id)
    model = PaliGemmaForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # the (1 + w) norms start at w = 0
        for name, module in model.named_modules():
            if type(module).__name__ in ("GemmaRMSNorm", "Gemma2RMSNorm"):
                module.weight.normal_(0.0, 0.3)
    model.save_pretrained(path)
    proc.save_pretrained(path)


SPEC = TinySpec(
    family="paligemma",
    build=build,
    hf_class="PaliGemmaForConditionalGeneration",
    prompts=["what is this", "<image><image>describe the image a cat a dog"],
    images=[image(0), [image(1), image(2, (30, 18))]],
    other_images=[image(10), [image(11), image(12, (30, 18))]],
    # HF's generate gives each generated token token_type_ids 1: it joins the causal suffix.
    generated_token_inputs={"token_type_ids": 1},
)


# -- real size ---------------------------------------------------------------------------
def released() -> Released:
    from transformers import (GemmaConfig, PaliGemmaConfig, PaliGemmaProcessor,
                              SiglipImageProcessorPil, SiglipVisionConfig)

    tok = tokenizer()
    # google/paligemma-3b-pt-224 (and paligemma2-3b-pt-224) preprocessor_config.json:
    # SiglipImageProcessor, size 224x224 (the class default), resample 3 (bicubic),
    # image_mean/std 0.5 (IMAGENET_STANDARD, the class default), image_seq_length 256
    # (convert_paligemma_weights_to_hf.py / convert_paligemma2_weights_to_hf.py:
    # (224 // 14) ** 2).
    image_processor = SiglipImageProcessorPil(size={"height": 224, "width": 224},
                                              image_seq_length=256)
    proc = PaliGemmaProcessor(image_processor=image_processor, tokenizer=tok)
    # Conversion scripts: SigLIP So400m at 224 px with 14 px patches, no head; image token
    # 257152 in the released vocabulary (here the tiny tokenizer's id).
    config = PaliGemmaConfig(
        text_config=GemmaConfig(vocab_size=len(tok)).to_dict(),
        vision_config=SiglipVisionConfig(image_size=224, patch_size=14,
                                         vision_use_head=False).to_dict(),
        image_token_index=tok.convert_tokens_to_ids(IMG), vocab_size=len(tok))
    return Released(proc, config)


# Every picture is resized (bicubic, aspect ratio not kept, no crop) to 224x224; SigLIP's
# 14 px patches make a 16x16 grid = 256 tokens, whatever the picture's size.
REAL_SIZE = fixed(16, 16, (224, 224), PHOTO, WIDE, TALL, SMALL)
