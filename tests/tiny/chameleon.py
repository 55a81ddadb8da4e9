"""Tiny Chameleon: VQ tokenizer (16px images -> 4x4 = 16 codes, codebook of 16) + decoder.

``build(path, swin_norm=True)`` gives the 30B/34B layout (norms after attention/MLP);
the SPEC below is the 7B (pre-norm) layout. Image codes are real vocabulary entries
``IMGIMG<digits as letters>Z``, found through ``config.vocabulary_map``.
"""

from typing import Optional

from tests.tiny import TinySpec, image, make_sentencepiece_tokenizer, make_tokenizer

N_CODES = 16          # VQ codebook size
IMAGE_SIZE = 16       # pixels; two downsamplings -> 4x4 latent grid
IMAGE_SEQ_LENGTH = 16
SPECIALS = ["<image>", "<racm3:break>", "<eoss>", "<reserved08706>"]


def code_token(code: int) -> str:
    """Chameleon's BPE name of VQ code ``code``: digits written as letters A-J."""
    return "IMGIMG" + "".join(chr(ord("A") + int(d)) for d in str(code)) + "Z"


def make_chameleon_tokenizer(sentencepiece: bool = False):
    """The word-level tiny vocabulary, or (``sentencepiece``) a Llama-style one that can
    spell any word (ImageNet's class names) from letters."""
    codes = [code_token(i) for i in range(N_CODES)]
    if sentencepiece:
        return make_sentencepiece_tokenizer(SPECIALS, extra_pieces=codes,
                                            sep_token="<reserved08706>")
    return make_tokenizer(SPECIALS, extra_vocab=codes, sep_token="<reserved08706>")


def build(path, swin_norm: bool = False, layers: int = 2, hidden: int = 32, heads: int = 4,
          image_size: int = IMAGE_SIZE, kv_heads: int = 2, mlp: Optional[int] = None,
          vocab: Optional[int] = None, sentencepiece: bool = False):
    """Write the tiny Chameleon (the benchmarks ask for bigger ones: more layers, a wider
    model, ``image_size`` pixels -> ``(image_size / 4)^2`` codes per image; ``mlp`` is
    the MLP width (default ``2 * hidden``), ``vocab`` pads the vocabulary beyond the
    tokenizer's, e.g. to Chameleon-7B's 65536)."""
    import torch
    from transformers import (ChameleonConfig, ChameleonForConditionalGeneration,
                              ChameleonImageProcessorPil, ChameleonProcessor)

    tok = make_chameleon_tokenizer(sentencepiece)
    cfg = ChameleonConfig(
        vocab_size=max(len(tok), vocab or 0), hidden_size=hidden,
        intermediate_size=mlp or 2 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=256 + 2 * (image_size // 4) ** 2,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, swin_norm=swin_norm,
        vocabulary_map=tok.get_vocab(),
        vq_config=dict(embed_dim=8, num_embeddings=N_CODES, latent_channels=8,
                       resolution=image_size, base_channels=32, channel_multiplier=[1, 1, 1],
                       num_res_blocks=1, attn_resolutions=None),
    )
    model = ChameleonForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        # Norm weights init to 1/0: randomise them so their placement (pre vs post) and
        # the per-head QK LayerNorm affine terms actually matter numerically.
        for name, p in model.model.named_parameters():
            if "vqmodel" in name:
                continue
            if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                p.copy_(1 + 0.3 * torch.randn_like(p))
            elif name.endswith("norm.bias"):
                p.copy_(0.3 * torch.randn_like(p))
        # The random encoder's latents have std ~0.01; a codebook on that scale makes
        # the nearest code vary with the image (at std 1 one code wins everywhere).
        model.model.vqmodel.quantize.embedding.weight.normal_(std=0.01)
    model.save_pretrained(path)
    processor = ChameleonProcessor(
        image_processor=ChameleonImageProcessorPil(
            size={"shortest_edge": image_size},
            crop_size={"height": image_size, "width": image_size}),
        tokenizer=tok, image_seq_length=(image_size // 4) ** 2)
    processor.save_pretrained(path)


SPEC = TinySpec(
    family="chameleon",
    build=build,
    hf_class="ChameleonForConditionalGeneration",
    prompts=["what is this", "<image> a cat <image> describe the image a dog"],
    images=[image(0), [image(1), image(2, (30, 18))]],
    other_images=[image(10), [image(11), image(12, (30, 18))]],
    notes="7B layout (pre-norm); the swin_norm=True layout is tested in "
          "tests/test_positions_chameleon.py",
)
