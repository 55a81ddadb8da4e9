"""Tiny Emu3: a 4-level VQ-VAE (spatial factor 8, 16 codes) + a Llama-shaped decoder.

Images are resized to multiples of 8 pixels (``min_pixels``/``max_pixels`` keep them
tiny): a 20x24 picture becomes 16x24 pixels, a 2x3 code grid, 2 * (3 + 1) = 8 image
tokens (each row ends with the EOL slot); a 30x18 one becomes 32x16, a 4x2 grid, 12
tokens (used by the position tests). The tokenizer splits digits and ``*`` so the size
prefix "2*3" is 3 tokens, as Emu3's original (Qwen-style tiktoken) tokenizer does;
``tokenizer(whole_numbers=True)`` keeps each number one token ("60*80" -> "60", "*", "80"),
as the GPT-2 byte-level pre-tokenizer of the converted ``Emu3-Chat-hf`` tokenizer groups
digits.
"""

from tests.tiny import TinySpec, image, make_tokenizer

BOI, EOI, WRAP, IMG = "<|image start|>", "<|image end|>", "<|image token|>", "<image>"
EOL, EOF = "<|extra_200|>", "<|extra_201|>"
CODEBOOK = 16


def tokenizer(whole_numbers: bool = False):
    """Emu3's image tokens; size-prefix digits one token each, or whole numbers (up to 999)."""
    from tokenizers import Regex, pre_tokenizers

    visual = [f"<|visual token {i:06d}|>" for i in range(CODEBOOK)]
    numbers = [str(n) for n in range(1000)] if whole_numbers else list("0123456789")
    tok = make_tokenizer(
        [BOI, EOI, WRAP, IMG, EOL, EOF],
        extra_vocab=[*numbers, "*", *visual],
        extra_special_tokens={"image_token": IMG, "boi_token": BOI, "eoi_token": EOI,
                              "image_wrapper_token": WRAP, "eof_token": EOF},
    )
    digits = (pre_tokenizers.Split(Regex(r"\d+"), behavior="isolated") if whole_numbers
              else pre_tokenizers.Digits(individual_digits=True))
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(), digits,
        pre_tokenizers.Split("*", behavior="isolated"),
    ])
    return tok


def build(path):
    import torch
    from transformers import (Emu3Config, Emu3ForConditionalGeneration, Emu3ImageProcessor,
                              Emu3Processor, Emu3TextConfig, Emu3VQVAEConfig)

    tok = tokenizer()
    cfg = Emu3Config(
        text_config=Emu3TextConfig(
            vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
            attention_dropout=0.0, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id),
        vq_config=Emu3VQVAEConfig(
            codebook_size=CODEBOOK, embed_dim=4, latent_channels=4, base_channels=32,
            channel_multiplier=[1, 1, 1, 1], num_res_blocks=1, attn_resolutions=[],
            hidden_size=32, num_attention_heads=1, temporal_downsample_factor=2),
        vocabulary_map=tok.get_vocab(),
    )
    model = Emu3ForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # spread the codebook so different pictures give different codes
        model.model.vqmodel.quantize.embedding.weight.normal_()
    model.save_pretrained(path)
    processor = Emu3Processor(
        image_processor=Emu3ImageProcessor(min_pixels=8 * 8 * 4, max_pixels=32 * 32,
                                           spatial_factor=8),
        tokenizer=tok)
    processor.save_pretrained(path)


SPEC = TinySpec(
    family="emu3",
    build=build,
    hf_class="Emu3ForConditionalGeneration",
    prompts=["what is this", "<image> a cat <image> describe the image a dog"],
    # Same-size pictures: the processor pads a batch's images to the largest, and the VQ
    # encoder (convolutions, a global attention block) sees that padding, so mixed sizes
    # would make an image's codes depend on its batch (HF behaviour, see the adapter).
    images=[image(0), [image(1), image(2)]],
    other_images=[image(10), [image(11), image(12)]],
    notes="same-size images in the harness batch: VQ codes depend on batch pixel padding",
)
