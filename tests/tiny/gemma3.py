"""Tiny Gemma 3: SigLIP tower (16px images, 4px patches -> 4x4, avg-pooled to 2x2 = 4
soft tokens) + Gemma 3 text model with one sliding (window 4) and one full layer.

Gemma 3 initialises ``mm_input_projection_weight`` (and every ``(1 + w)`` RMSNorm) to
zero; the projector is randomised so the image reaches the logits, and the norms so the
bridge's post-norms and q/k norms are checked with non-trivial weights.
"""

from tests.tiny import TinySpec, image, make_tokenizer

BOI, IMG, EOI = "<start_of_image>", "<image_soft_token>", "<end_of_image>"


def tokenizer():
    from tokenizers import processors

    tok = make_tokenizer([BOI, IMG, EOI], bos="<bos>", eos="<eos>",
                         extra_special_tokens={"boi_token": BOI, "image_token": IMG,
                                               "eoi_token": EOI})
    # Like the real Gemma tokenizer, every sequence starts with <bos>.
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", tok.bos_token_id)])
    return tok


def build(path):
    import torch
    from transformers import (Gemma3Config, Gemma3ForConditionalGeneration,
                              Gemma3ImageProcessorPil, Gemma3Processor, Gemma3TextConfig,
                              SiglipVisionConfig)

    tok = tokenizer()
    ids = {t: tok.convert_tokens_to_ids(t) for t in (BOI, IMG, EOI)}
    cfg = Gemma3Config(
        text_config=Gemma3TextConfig(
            vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=8,
            sliding_window=4, layer_types=["sliding_attention", "full_attention"],
            max_position_embeddings=256, pad_token_id=tok.pad_token_id,
            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id),
        vision_config=SiglipVisionConfig(hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4,
                                         image_size=16, patch_size=4),
        mm_tokens_per_image=4,
        boi_token_index=ids[BOI], eoi_token_index=ids[EOI], image_token_index=ids[IMG],
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    model = Gemma3ForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # undo the zero inits that would hide the image / the norms
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(0.0, 0.5)
        for name, module in model.named_modules():
            if type(module).__name__ == "Gemma3RMSNorm":
                module.weight.normal_(0.0, 0.3)
    model.save_pretrained(path)
    processor = Gemma3Processor(
        image_processor=Gemma3ImageProcessorPil(size={"height": 16, "width": 16},
                                                do_pan_and_scan=False),
        tokenizer=tok, image_seq_length=4)
    processor.save_pretrained(path)


SPEC = TinySpec(
    family="gemma3",
    build=build,
    hf_class="Gemma3ForConditionalGeneration",
    prompts=["what is this", "<start_of_image> a cat <start_of_image> describe the image a dog"],
    images=[image(0), [image(1), image(2, (30, 18))]],
    other_images=[image(10), [image(11), image(12, (30, 18))]],
)
