"""Tiny Gemma 4: a 2-layer ViT (4 px patches, 3x3 pooling, 70 soft tokens at most) + a
Gemma 4 text model with one sliding (window 8) and one full layer.

The text model switches on what the released variants add to Gemma 3, all at once:
per-layer embeddings (E2B/E4B), a full layer with its own head size, one key/value head
and no ``v_proj`` (``attention_k_eq_v``, 31B/26B-A4B), an expert block beside the MLP
(26B-A4B), bidirectional attention inside each image on the sliding layer
(``use_bidirectional_attention="vision"``, 31B/26B-A4B) and the final logit soft-cap.
KV sharing needs a third layer (a shared layer reuses an earlier one of its type): the
``kv_shared=True`` variant has layers sliding, full, full, the last reusing the second's
keys and values (``tests/test_positions_gemma4.py`` checks it).

``max_soft_tokens`` must be one of 70, 140, 280, 560, 1120, and the image processor
resizes every picture to hold about that many: a 20x24 picture becomes 84x108 px (21x27
patches, 7x9 = 63 soft tokens), a 30x18 one 120x72 px (30x18 patches, 10x6 = 60).

Gemma 4 initialises the patch position table to ones (every patch at the same place)
and ``layer_scalar`` and the norms to ones; they are randomised so that the image's
layout and the bridge's norms and scalars are checked with non-trivial weights.
"""

from tests.tiny import TinySpec, image, make_tokenizer

BOI, IMG, EOI = "<|image>", "<|image|>", "<image|>"
AUDIO, BOA, EOA, VIDEO = "<|audio|>", "<|audio>", "<audio|>", "<|video|>"


def tokenizer():
    """The released strings (convert_gemma4_weights.py ``extra_special_tokens``); like the
    released tokenizer (``add_bos_token=False``) it adds no BOS. ``<|video|>`` is in the
    vocabulary already, as the processor would add it."""
    return make_tokenizer([BOI, IMG, EOI, AUDIO, BOA, EOA, VIDEO], bos="<bos>", eos="<eos>",
                          extra_special_tokens={"image_token": IMG, "boi_token": BOI,
                                                "eoi_token": EOI, "audio_token": AUDIO,
                                                "boa_token": BOA, "eoa_token": EOA})


def build(path, kv_shared=False):
    import torch
    from transformers import (Gemma4AudioFeatureExtractor, Gemma4Config,
                              Gemma4ForConditionalGeneration, Gemma4ImageProcessorPil,
                              Gemma4Processor, Gemma4TextConfig, Gemma4VisionConfig)

    import tl_vlm.adapters.gemma4  # noqa: F401  (image-only processor without torchvision)

    tok = tokenizer()
    ids = {t: tok.convert_tokens_to_ids(t) for t in (BOI, IMG, EOI, AUDIO, BOA, EOA, VIDEO)}
    layer_types = ["sliding_attention", "full_attention"] + (["full_attention"] if kv_shared else [])
    text = Gemma4TextConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64,
        num_hidden_layers=len(layer_types), layer_types=layer_types,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        global_head_dim=16, num_global_key_value_heads=1, attention_k_eq_v=True,
        sliding_window=8, use_bidirectional_attention="vision",
        vocab_size_per_layer_input=len(tok), hidden_size_per_layer_input=8,
        num_kv_shared_layers=1 if kv_shared else 0,
        enable_moe_block=True, num_experts=4, top_k_experts=2, moe_intermediate_size=16,
        final_logit_softcapping=30.0, max_position_embeddings=512,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id)
    vision = Gemma4VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=4, head_dim=8,
                                patch_size=4, pooling_kernel_size=3, position_embedding_size=128)
    cfg = Gemma4Config(
        text_config=text, vision_config=vision, audio_config=None,
        image_token_id=ids[IMG], boi_token_id=ids[BOI], eoi_token_id=ids[EOI],
        audio_token_id=ids[AUDIO], boa_token_id=ids[BOA], eoa_token_index=ids[EOA],
        video_token_id=ids[VIDEO], pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    model = Gemma4ForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # undo the constant inits that would hide the layout / the norms
        model.model.vision_tower.patch_embedder.position_embedding_table.normal_(0.0, 1.0)
        for name, module in model.named_modules():
            if type(module).__name__ == "Gemma4RMSNorm" and getattr(module, "with_scale", False):
                module.weight.normal_(1.0, 0.3)
            if type(module).__name__ == "Gemma4TextDecoderLayer":
                module.layer_scalar.uniform_(0.5, 1.5)
    model.save_pretrained(path)
    processor = Gemma4Processor(
        feature_extractor=Gemma4AudioFeatureExtractor(),
        image_processor=Gemma4ImageProcessorPil(patch_size=4, max_soft_tokens=70,
                                                pooling_kernel_size=3),
        tokenizer=tok, image_seq_length=70)
    processor.save_pretrained(path)


SPEC = TinySpec(
    family="gemma4",
    build=build,
    hf_class="Gemma4ForConditionalGeneration",
    prompts=["what is this", "<|image|> a cat <|image|> describe the image a dog"],
    images=[image(0), [image(1), image(2, (30, 18))]],
    other_images=[image(10), [image(11), image(12, (30, 18))]],
    # The per-layer inputs are computed from the input embeddings, image features
    # included: [batch, pos, layer, d_per_layer], the image's second way in.
    image_entry_hooks=("per_layer_projection_norm.hook_out",),
)


# -- released size ----------------------------------------------------------------------
def released():
    """google/gemma-4-* processors as convert_gemma4_weights.py writes them:
    ``Gemma4ImageProcessor(image_seq_length=280, do_normalize=False, max_soft_tokens=280,
    pooling_kernel_size=3)`` (``default_output_length`` 280 of both vision configs), the
    class's 16 px patches, and ``Gemma4Processor(image_seq_length=280)``; the vision
    config's ``pooling_kernel_size`` is 3 in both ``_ON_DEVICE_VISION_CONFIG`` and
    ``_LARGE_MODEL_VISION_CONFIG``."""
    from transformers import (Gemma4AudioFeatureExtractor, Gemma4Config, Gemma4ImageProcessorPil,
                              Gemma4Processor, Gemma4TextConfig, Gemma4VisionConfig)

    import tl_vlm.adapters.gemma4  # noqa: F401  (image-only processor without torchvision)
    from tests.real_size import Released

    tok = tokenizer()
    image_processor = Gemma4ImageProcessorPil(patch_size=16, max_soft_tokens=280,
                                              pooling_kernel_size=3, do_normalize=False)
    processor = Gemma4Processor(feature_extractor=Gemma4AudioFeatureExtractor(),
                                image_processor=image_processor, tokenizer=tok,
                                image_seq_length=280)
    ids = tok.convert_tokens_to_ids
    config = Gemma4Config(
        text_config=Gemma4TextConfig(vocab_size=len(tok)),
        vision_config=Gemma4VisionConfig(patch_size=16, pooling_kernel_size=3),
        image_token_id=ids(IMG), boi_token_id=ids(BOI), eoi_token_id=ids(EOI),
        audio_token_id=ids(AUDIO), boa_token_id=ids(BOA), eoa_token_index=ids(EOA),
        video_token_id=ids(VIDEO))
    return Released(processor, config)


def _real_size():
    from tests.real_size import PHOTO, SMALL, TALL, WIDE, Expected

    # Aspect ratio kept; both sides floored to multiples of 3 * 16 = 48 px after scaling
    # the area to 280 * 9 patches of 16x16 px = 645120 px (up or down); one soft token
    # per 48x48 px (3x3 patches pooled).
    return {
        # 480x640: x sqrt(645120 / 307200) = x1.44914 -> 695.6 x 927.5 -> 672 x 912 px
        PHOTO: Expected(((14, 19),)),
        # 1080x1920: x0.557773 -> 602.4 x 1070.9 -> 576 x 1056 px
        WIDE: Expected(((12, 22),)),
        TALL: Expected(((22, 12),)),
        # 40x40: x20.0798 -> 803.2 x 803.2 -> 768 x 768 px
        SMALL: Expected(((16, 16),)),
        # 200x2000: x1.26996 -> 254.0 x 2539.9 -> 240 x 2496 px
        (200, 2000): Expected(((5, 52),)),
    }


REAL_SIZE = _real_size()
