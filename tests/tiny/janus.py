"""Tiny Janus: SigLIP-like tower (16px images, 4px patches -> 4x4 = 16 tokens), a
2-layer aligner, a Llama decoder (GQA), and a small (unused here) generation VQ path.

The tokenizer adds BOS like Janus' Llama tokenizer; the processor is saved without
the default system prompt (the position tests also run it with one).
"""

from tests.tiny import TinySpec, image, make_tokenizer

IMG, BOI, EOI = "<image_placeholder>", "<begin_of_image>", "<end_of_image>"


def tokenizer():
    from tokenizers import processors

    tok = make_tokenizer(
        [IMG, BOI, EOI],
        extra_special_tokens={"image_token": IMG, "boi_token": BOI, "eoi_token": EOI},
    )  # no padding_side: like the released checkpoints, so JanusProcessor defaults to left
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.bos_token_id)])
    return tok


def build(path):
    import torch
    from transformers import (JanusConfig, JanusForConditionalGeneration, JanusImageProcessorPil,
                              JanusProcessor, JanusVisionConfig, JanusVQVAEConfig, LlamaConfig)

    tok = tokenizer()
    cfg = JanusConfig(
        text_config=LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                max_position_embeddings=256, pad_token_id=tok.pad_token_id,
                                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id),
        vision_config=JanusVisionConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                        image_size=16, patch_size=4, projection_dim=32, depth=2,
                                        num_image_tokens=16),
        vq_config=JanusVQVAEConfig(embed_dim=8, num_embeddings=16, latent_channels=32,
                                   base_channels=32, channel_multiplier=[1, 1], num_res_blocks=1,
                                   projection_dim=32, image_token_embed_dim=32,
                                   num_hidden_layers=1),
        image_token_id=tok.convert_tokens_to_ids(IMG),
    )
    model = JanusForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # make sure the aligner output is not negligible
        for p in model.model.aligner.parameters():
            p.normal_(0, 0.2)
    model.save_pretrained(path)
    processor = JanusProcessor(
        image_processor=JanusImageProcessorPil(size={"height": 16, "width": 16}, min_size=4),
        tokenizer=tok, num_image_tokens=16, use_default_system_prompt=False)
    processor.save_pretrained(path)


SPEC = TinySpec(
    family="janus",
    build=build,
    hf_class="JanusForConditionalGeneration",
    prompts=["what is this", f"{IMG} a cat {IMG} describe the image a dog"],
    images=[image(0), [image(1), image(2, (30, 18))]],
    other_images=[image(10), [image(11), image(12, (30, 18))]],
)
