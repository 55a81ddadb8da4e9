"""Tiny random checkpoints of model types that have no family file (the generic path).

Kept out of ``tests/tiny/`` on purpose: every module there is a named family and is
parametrised into the family-wide tests; these load through
:func:`tl_vlm.core.generic.generic_family` instead (``tests/test_generic.py``).

Each builder writes a random model (hidden 32, 2 layers) and its processor at tiny
image sizes, like ``tests/tiny``; the configs follow the ``*ModelTester`` classes of
transformers' own tests (``tests/models/<type>/test_modeling_<type>.py``), shrunk.
Also here: processors that break one assumption of the generic path each, for the
refusal tests.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from tests.tiny import image, make_tokenizer

#: specials every tiny tokenizer here also holds, for the processors of the refusal tests
WRAPPERS = ["<x>", "</x>", "<y>", "</y>"]


def _text(tok, model_type: str, **extra: Any) -> dict:
    return dict(model_type=model_type, vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=512, pad_token_id=tok.pad_token_id, **extra)


def vipllava(path) -> None:
    """VipLlava: CLIP tower (16 px, 4 px patches: 16 features), features of two tower
    layers, Llama text. ``<image>`` x 16, no BOI/EOI, no grid report."""
    from transformers import (CLIPImageProcessorPil, CLIPVisionConfig, LlavaProcessor,
                              VipLlavaConfig, VipLlavaForConditionalGeneration)

    tok = make_tokenizer(["<image>", *WRAPPERS], extra_special_tokens={"image_token": "<image>"})
    cfg = VipLlavaConfig(
        text_config=_text(tok, "llama"),
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, image_size=16, patch_size=4,
                                       projection_dim=32),
        image_token_index=tok.convert_tokens_to_ids("<image>"), vision_feature_layers=[-1, -2])
    VipLlavaForConditionalGeneration(cfg).eval().save_pretrained(path)
    LlavaProcessor(image_processor=CLIPImageProcessorPil(size={"shortest_edge": 16},
                                                         crop_size={"height": 16, "width": 16}),
                   tokenizer=tok, patch_size=4, vision_feature_select_strategy="default",
                   num_additional_image_tokens=1).save_pretrained(path)


def vipllava_gemma3(path) -> None:
    """VipLlava over a Gemma 3 text decoder (Gemma-style layers: pre- and post-norms,
    q/k norms, a sliding-window layer); the norms' zero-offset init is perturbed so that
    they matter."""
    import torch
    from transformers import (CLIPImageProcessorPil, CLIPVisionConfig, Gemma3TextConfig,
                              LlavaProcessor, VipLlavaConfig, VipLlavaForConditionalGeneration)

    tok = make_tokenizer(["<image>", *WRAPPERS], extra_special_tokens={"image_token": "<image>"})
    cfg = VipLlavaConfig(
        text_config=Gemma3TextConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                     num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=2, head_dim=8, sliding_window=4,
                                     layer_types=["sliding_attention", "full_attention"],
                                     pad_token_id=tok.pad_token_id),
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, image_size=16, patch_size=4),
        image_token_index=tok.convert_tokens_to_ids("<image>"), vision_feature_layers=[-1, -2])
    model = VipLlavaForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.normal_(0, 0.3)
    model.save_pretrained(path)
    LlavaProcessor(image_processor=CLIPImageProcessorPil(size={"shortest_edge": 16},
                                                         crop_size={"height": 16, "width": 16}),
                   tokenizer=tok, patch_size=4, vision_feature_select_strategy="default",
                   num_additional_image_tokens=1).save_pretrained(path)


def deepseek_vl(path) -> None:
    """DeepSeek-VL: SigLIP tower (16 px, 4 px patches), Llama text; the processor writes
    ``num_image_tokens`` (16) x ``<image_placeholder>``."""
    from transformers import (DeepseekVLConfig, DeepseekVLForConditionalGeneration,
                              DeepseekVLProcessor, SiglipVisionConfig)
    from transformers.models.deepseek_vl.image_processing_pil_deepseek_vl import (
        DeepseekVLImageProcessorPil)

    tok = make_tokenizer(["<image_placeholder>", *WRAPPERS],
                         extra_special_tokens={"image_token": "<image_placeholder>"})
    cfg = DeepseekVLConfig(
        text_config=_text(tok, "llama"),
        vision_config=SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, image_size=16, patch_size=4),
        image_token_id=tok.convert_tokens_to_ids("<image_placeholder>"))
    DeepseekVLForConditionalGeneration(cfg).eval().save_pretrained(path)
    DeepseekVLProcessor(image_processor=DeepseekVLImageProcessorPil(size={"height": 16, "width": 16}),
                        tokenizer=tok, num_image_tokens=16).save_pretrained(path)


def got_ocr2(path) -> None:
    """GOT-OCR2: SAM-style tower (64 px, 1 px patches, windowed attention) whose neck
    downsamples 4x4 to 16x16 = 256 features (the processor always writes 256
    ``<imgpad>``), Qwen2 text. ``<img>``/``</img>`` are the prompt's own text here."""
    from transformers import GotOcr2Config, GotOcr2ForConditionalGeneration, GotOcr2Processor
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    tok = make_tokenizer(["<imgpad>", "<img>", "</img>", "<|im_start|>", "<|im_end|>", *WRAPPERS])
    cfg = GotOcr2Config(
        text_config=_text(tok, "qwen2"),
        vision_config=dict(num_hidden_layers=2, output_channels=16, hidden_size=16, mlp_dim=32,
                           num_attention_heads=2, patch_size=1, image_size=64, window_size=8,
                           global_attn_indexes=[], initializer_range=0.02),  # 1e-10 by default
        image_token_index=tok.convert_tokens_to_ids("<imgpad>"))
    GotOcr2ForConditionalGeneration(cfg).eval().save_pretrained(path)
    GotOcr2Processor(image_processor=GotOcr2ImageProcessorPil(size={"height": 64, "width": 64}),
                     tokenizer=tok).save_pretrained(path)


def lighton_ocr(path) -> None:
    """LightOnOCR: Pixtral tower (longest edge 32 px, 4 px patches, 2x2 merge: 8 px per
    token), Qwen3 text (q/k norms). ``<|image_pad|>`` per token, rows from ``image_sizes``."""
    from transformers import LightOnOcrConfig, LightOnOcrForConditionalGeneration, LightOnOcrProcessor
    from transformers.models.pixtral.image_processing_pil_pixtral import PixtralImageProcessorPil

    tok = make_tokenizer(["<|image_pad|>", "<|vision_pad|>", "<|vision_end|>", *WRAPPERS],
                         extra_special_tokens={"image_token": "<|image_pad|>",
                                               "image_break_token": "<|vision_pad|>",
                                               "image_end_token": "<|vision_end|>"})
    cfg = LightOnOcrConfig(
        text_config=_text(tok, "qwen3", head_dim=8),
        vision_config=dict(model_type="pixtral", hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=4, head_dim=8, image_size=32,
                           patch_size=4),
        image_token_id=tok.convert_tokens_to_ids("<|image_pad|>"), spatial_merge_size=2)
    LightOnOcrForConditionalGeneration(cfg).eval().save_pretrained(path)
    LightOnOcrProcessor(image_processor=PixtralImageProcessorPil(size={"longest_edge": 32},
                                                                 patch_size=8),
                        tokenizer=tok, patch_size=4, spatial_merge_size=2).save_pretrained(path)


def paddleocr_vl(path) -> None:
    """PaddleOCR-VL: NaViT-style tower (4 px patches, 2x2 merge, 256..1024 pixels), Ernie
    text with M-RoPE; ``<|IMAGE_PLACEHOLDER|>`` per merged patch, rows from
    ``image_grid_thw``."""
    from transformers import PaddleOCRVLConfig, PaddleOCRVLForConditionalGeneration, PaddleOCRVLProcessor
    from transformers.models.paddleocr_vl.image_processing_pil_paddleocr_vl import (
        PaddleOCRVLImageProcessorPil)

    tok = make_tokenizer(["<|IMAGE_PLACEHOLDER|>", *WRAPPERS],
                         extra_special_tokens={"image_token": "<|IMAGE_PLACEHOLDER|>"})
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]}
    text = _text(tok, "paddleocr_vl_text", head_dim=8, rope_parameters=rope)
    text.pop("model_type")
    cfg = PaddleOCRVLConfig(
        text_config=text,
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, image_size=16, patch_size=4, spatial_merge_size=2),
        image_token_id=tok.convert_tokens_to_ids("<|IMAGE_PLACEHOLDER|>"))
    PaddleOCRVLForConditionalGeneration(cfg).eval().save_pretrained(path)
    PaddleOCRVLProcessor(image_processor=PaddleOCRVLImageProcessorPil(
        patch_size=4, merge_size=2, min_pixels=16 * 16, max_pixels=32 * 32),
        tokenizer=tok).save_pretrained(path)


def qianfan_ocr(path) -> None:
    """Qianfan-OCR: InternViT-style tower (16 px tiles, 4 px patches, pixel shuffle 0.5: 4
    features per tile), Qwen3 text. The prompt writes ``<image>``; the processor writes
    ``<img>`` + 4 x tiles ``<IMG_CONTEXT>`` + ``</img>`` and marks all three."""
    from transformers import QianfanOCRConfig, QianfanOCRForConditionalGeneration, QianfanOCRProcessor
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    tok = make_tokenizer(["<IMG_CONTEXT>", "<img>", "</img>", "<image>", *WRAPPERS],
                         extra_special_tokens={"start_image_token": "<img>",
                                               "end_image_token": "</img>",
                                               "context_image_token": "<IMG_CONTEXT>"})
    cfg = QianfanOCRConfig(
        text_config=_text(tok, "qwen3", head_dim=8),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, image_size=16, patch_size=4),
        image_token_id=tok.convert_tokens_to_ids("<IMG_CONTEXT>"), image_seq_length=4)
    QianfanOCRForConditionalGeneration(cfg).eval().save_pretrained(path)
    QianfanOCRProcessor(image_processor=GotOcr2ImageProcessorPil(size={"height": 16, "width": 16},
                                                                 max_patches=2),
                        tokenizer=tok, image_seq_length=4).save_pretrained(path)


@dataclass
class GenericTiny:
    """One model type on the generic path: its builder, a padded batch (``{img}`` is the
    layout's placeholder; the first prompt's image goes first), and what the load notice
    must say it inferred."""

    build: Callable[[Any], None]
    notice: tuple[str, ...]
    prompts: list[str] = field(default_factory=lambda: [
        "what is this", "a cat {img} describe {img} the image a dog"])
    images: list[Any] = field(default_factory=lambda: [image(0), [image(1), image(2, (30, 18))]])
    other_images: list[Any] = field(default_factory=lambda: [
        image(10), [image(11), image(12, (30, 18))]])


NO_ENDS = "BOI/EOI = none (nothing the processor marks or inserts around the runs)"
SPECS = {
    "vipllava": GenericTiny(vipllava, (
        "VipLlavaForConditionalGeneration", "decoder = 2 Llama-style LlamaDecoderLayer",
        "content = image_token_id 4 '<image>' (config image_token_id)", NO_ENDS,
        "grid = 1-D (the processor reports none)")),
    "vipllava_gemma3": GenericTiny(vipllava_gemma3, (
        "VipLlavaForConditionalGeneration", "decoder = 2 Gemma-style Gemma3DecoderLayer",
        "(q/k norms)", NO_ENDS, "grid = 1-D")),
    "deepseek_vl": GenericTiny(deepseek_vl, (
        "DeepseekVLForConditionalGeneration", "decoder = 2 Llama-style LlamaDecoderLayer",
        "content = image_token_id 4 '<image_placeholder>' (config image_token_id)", NO_ENDS,
        "grid = 1-D")),
    "got_ocr2": GenericTiny(got_ocr2, (
        "GotOcr2ForConditionalGeneration", "decoder = 2 Llama-style Qwen2DecoderLayer",
        "content = image_token_id 4 '<imgpad>'", NO_ENDS, "grid = 1-D")),
    "lighton_ocr": GenericTiny(lighton_ocr, (
        "LightOnOcrForConditionalGeneration", "Qwen3DecoderLayer", "(q/k norms)",
        "content = image_token_id 4 '<|image_pad|>'", NO_ENDS,
        "grid = rows from image_sizes / 8 px per token")),
    "paddleocr_vl": GenericTiny(paddleocr_vl, (
        "PaddleOCRVLForConditionalGeneration", "PaddleOCRDecoderLayer",
        "content = image_token_id 4 '<|IMAGE_PLACEHOLDER|>'", NO_ENDS,
        "grid = rows from image_grid_thw / merge size 2")),
    "qianfan_ocr": GenericTiny(qianfan_ocr, (
        "QianfanOCRForConditionalGeneration", "Qwen3DecoderLayer", "(q/k norms)",
        "content = image_token_id 4 '<IMG_CONTEXT>'",
        "BOI/EOI = '<img>'/'</img>' (the processor marks them)", "grid = 1-D",
        "placeholder '<image>'")),
}


# -- processors that break one assumption each (the refusal tests) ----------------------
def wrapping_processor(path, wrappers, marked=(), runs_per_image=1, joiner=" a "):
    """The tiny VipLlava's processor, writing image ``i`` as ``wrappers[i % n]`` =
    ``(before, after)`` around its ``<image>`` tokens (strings of special tokens), in
    ``runs_per_image`` runs joined by ``joiner``, and marking ``marked`` as image tokens."""
    from transformers import LlavaProcessor

    class Wrapping(LlavaProcessor):
        def replace_image_token(self, image_inputs, image_idx, **kwargs):
            tokens = super().replace_image_token(image_inputs, image_idx, **kwargs)
            before, after = wrappers[image_idx % len(wrappers)]
            return before + joiner.join([tokens] * runs_per_image) + after

        @property
        def image_token_ids(self):
            return [self.image_token_id, *(self.tokenizer.convert_tokens_to_ids(t) for t in marked)]

    return Wrapping.from_pretrained(str(path))


def extra_token_processor(path):
    """The tiny PaddleOCR-VL's processor writing one more image token than its
    ``image_grid_thw`` counts."""
    from transformers import PaddleOCRVLProcessor

    class OneMore(PaddleOCRVLProcessor):
        def replace_image_token(self, image_inputs, image_idx, **kwargs):
            return super().replace_image_token(image_inputs, image_idx, **kwargs) + self.image_token

    return OneMore.from_pretrained(str(path))


def renamed_token_processor(path):
    """The tiny VipLlava's processor writing ``<x>`` where it should write ``<image>``."""
    from transformers import LlavaProcessor

    class Renamed(LlavaProcessor):
        def replace_image_token(self, image_inputs, image_idx, **kwargs):
            return super().replace_image_token(image_inputs, image_idx, **kwargs).replace(
                self.image_token, "<x>")

    return Renamed.from_pretrained(str(path))
