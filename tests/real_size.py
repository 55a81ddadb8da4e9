"""Processors and configs at the released checkpoints' settings, for real-size layout tests.

Each builder returns a :class:`Released`: the family's processor built from transformers'
default (= released) image-processor settings, with the small word-level tokenizer of
``tests/tiny/<family>.py`` (which holds the family's real special-token strings), and the
model config the layout reads, sized like the released checkpoint. No model is built.

Where a released checkpoint overrides a class default, the value is set explicitly and
its source is cited. Sources: the checkpoints' ``preprocessor_config.json`` /
``processor_config.json`` / ``config.json`` on the Hugging Face hub, and transformers'
conversion scripts (``src/transformers/models/<family>/convert_*_weights_to_hf.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import tl_vlm.adapters  # noqa: F401  (processors that need torchvision only for videos)

PHOTO, WIDE, TALL, SMALL = (480, 640), (1080, 1920), (1920, 1080), (40, 40)  # (height, width)


@dataclass(frozen=True)
class Expected:
    """One image's content grid: ``blocks`` of (rows, cols) stacked top to bottom, and
    how many row-break tokens it has."""

    blocks: tuple[tuple[int, int], ...]
    breaks: int = 0

    @property
    def row_widths(self) -> list[int]:
        return [cols for rows, cols in self.blocks for _ in range(rows)]


def fixed(rows: int, cols: int, *sizes: tuple[int, int]) -> dict:
    """A family whose every image is resized/cropped to one size: one grid for all."""
    return {size: Expected(((rows, cols),)) for size in sizes}


@dataclass(frozen=True)
class Released:
    """One family's released-size processor and the config its layout reads.

    Attributes:
        processor: the HF processor (image processor at released settings).
        config: the model config (no weights), as the released checkpoint has it.
    """

    processor: Any
    config: Any


def chameleon() -> Released:
    from transformers import ChameleonConfig, ChameleonImageProcessorPil, ChameleonProcessor

    from tests.tiny.chameleon import make_chameleon_tokenizer

    tok = make_chameleon_tokenizer()
    # convert_chameleon_weights_to_hf.py: ChameleonImageProcessor() and ChameleonProcessor()
    # defaults (shortest edge 512, centre crop 512, image_seq_length 1024); the class
    # default VQ config is the 7B vqgan.yaml (ch_mult [1, 1, 2, 2, 4]: 4 downsamplings).
    processor = ChameleonProcessor(image_processor=ChameleonImageProcessorPil(), tokenizer=tok,
                                   image_seq_length=1024)  # facebook/chameleon-7b processor_config
    config = ChameleonConfig(vocabulary_map=tok.get_vocab())
    return Released(processor, config)


def emu3(whole_numbers: bool = True) -> Released:
    """``whole_numbers``: the size prefix "60*80" is 3 tokens, as with the converted
    Emu3-Chat-hf tokenizer (GPT-2 byte-level pre-tokenizer); else one token per digit."""
    from transformers import Emu3Config, Emu3ImageProcessor, Emu3Processor

    from tests.tiny.emu3 import tokenizer

    tok = tokenizer(whole_numbers=whole_numbers)
    # Emu3-community/Emu3-Chat-hf preprocessor_config.json: min_pixels 262144 (512^2),
    # max_pixels 1048576 (1024^2), spatial_factor 8 (the class defaults).
    image_processor = Emu3ImageProcessor(min_pixels=512 * 512, max_pixels=1024 * 1024,
                                         spatial_factor=8)
    processor = Emu3Processor(image_processor=image_processor, tokenizer=tok)
    config = Emu3Config(vocabulary_map=tok.get_vocab())
    return Released(processor, config)


def gemma3() -> Released:
    from transformers import (Gemma3Config, Gemma3ImageProcessorPil, Gemma3Processor,
                              Gemma3TextConfig, SiglipVisionConfig)

    from tests.tiny.gemma3 import tokenizer

    tok = tokenizer()
    # convert_gemma3_weights.py / google/gemma-3-4b-it preprocessor_config.json: 896x896,
    # image_seq_length 256, do_pan_and_scan null (the processor's default is off).
    image_processor = Gemma3ImageProcessorPil(size={"height": 896, "width": 896})
    processor = Gemma3Processor(image_processor=image_processor, tokenizer=tok,
                                image_seq_length=256)
    ids = tok.convert_tokens_to_ids
    config = Gemma3Config(
        text_config=Gemma3TextConfig(vocab_size=len(tok)),
        # convert_gemma3_weights.py _VISION_CONFIG: SigLIP at 896 px, 14 px patches.
        vision_config=SiglipVisionConfig(image_size=896, patch_size=14),
        mm_tokens_per_image=256, boi_token_index=ids(tok.boi_token),
        eoi_token_index=ids(tok.eoi_token), image_token_index=ids(tok.image_token))
    return Released(processor, config)


def janus() -> Released:
    from transformers import (JanusConfig, JanusImageProcessorPil, JanusProcessor,
                              JanusVisionConfig, JanusVQVAEConfig, LlamaConfig)

    from tests.tiny.janus import tokenizer

    tok = tokenizer()
    # deepseek-ai/Janus-Pro-* preprocessor_config.json: image_size 384, min_size 14 (the
    # class defaults); convert_janus_weights_to_hf.py turns on the default system prompt.
    image_processor = JanusImageProcessorPil(size={"height": 384, "width": 384}, min_size=14)
    processor = JanusProcessor(image_processor=image_processor, tokenizer=tok,
                               num_image_tokens=576, use_default_system_prompt=True)
    config = JanusConfig(text_config=LlamaConfig(vocab_size=len(tok)),
                         vision_config=JanusVisionConfig(image_size=384, patch_size=16),
                         vq_config=JanusVQVAEConfig(),
                         image_token_id=tok.convert_tokens_to_ids(tok.image_token))
    return Released(processor, config)


def llava() -> Released:
    from transformers import (CLIPImageProcessorPil, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaProcessor)

    from tests.tiny.llava import tokenizer

    tok = tokenizer()
    # openai/clip-vit-large-patch14-336 preprocessor: shortest edge 336, crop 336;
    # llava-hf/llava-1.5-7b-hf processor_config.json: patch_size 14, strategy "default",
    # num_additional_image_tokens 1 (CLS, dropped by "default").
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 336},
                                            crop_size={"height": 336, "width": 336})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tok, patch_size=14,
                               vision_feature_select_strategy="default",
                               num_additional_image_tokens=1)
    config = LlavaConfig(text_config=LlamaConfig(vocab_size=len(tok)),
                         vision_config=CLIPVisionConfig(image_size=336, patch_size=14),
                         image_token_id=tok.convert_tokens_to_ids("<image>"),
                         vision_feature_select_strategy="default", vision_feature_layer=-2)
    return Released(processor, config)


def llava_onevision() -> Released:
    from transformers import (LlavaOnevisionConfig, LlavaOnevisionImageProcessorPil,
                              LlavaOnevisionProcessor, Qwen2Config, SiglipVisionConfig)

    from tests.tiny.llava_onevision import tokenizer

    tok = tokenizer()
    # convert_llava_onevision_weights_to_hf.py: num_image_tokens 729, strategy "full",
    # SigLIP 384 px / 14 px patches; image_grid_pinpoints and anyres_max_9 are the class
    # defaults, as in llava-hf/llava-onevision-qwen2-0.5b-ov-hf.
    image_processor = LlavaOnevisionImageProcessorPil()
    processor = LlavaOnevisionProcessor(image_processor=image_processor, tokenizer=tok,
                                        num_image_tokens=729,
                                        vision_feature_select_strategy="full",
                                        vision_aspect_ratio="anyres_max_9")
    config = LlavaOnevisionConfig(
        text_config=Qwen2Config(vocab_size=len(tok)),
        vision_config=SiglipVisionConfig(image_size=384, patch_size=14),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        video_token_index=tok.convert_tokens_to_ids("<video>"),
        vision_feature_select_strategy="full", vision_feature_layer=-1,
        image_grid_pinpoints=image_processor.image_grid_pinpoints,
        vision_aspect_ratio="anyres_max_9")
    return Released(processor, config)


def pixtral() -> Released:
    from transformers import (LlavaConfig, MistralConfig, PixtralImageProcessorPil,
                              PixtralVisionConfig)
    from transformers.models.pixtral import PixtralProcessor

    from tests.tiny.pixtral import tokenizer

    tok = tokenizer()
    # convert_pixtral_weights_to_hf.py: PixtralImageProcessor() (longest edge 1024, 16 px
    # patches) and PixtralProcessor defaults (patch_size 16, spatial_merge_size 1), as in
    # mistral-community/pixtral-12b.
    processor = PixtralProcessor(image_processor=PixtralImageProcessorPil(), tokenizer=tok,
                                 patch_size=16, spatial_merge_size=1)
    config = LlavaConfig(text_config=MistralConfig(vocab_size=len(tok)),
                         vision_config=PixtralVisionConfig(image_size=1024, patch_size=16),
                         image_token_id=tok.convert_tokens_to_ids("[IMG]"),
                         vision_feature_select_strategy="full", vision_feature_layer=-1)
    return Released(processor, config)


def _qwen(processor_cls: Any, config_cls: Any) -> Released:
    from transformers import Qwen2VLImageProcessorPil

    from tests.tiny.qwen2_vl import token_ids, tokenizer

    tok = tokenizer()
    # Qwen/Qwen2-VL-*-Instruct and Qwen2.5-VL preprocessor_config.json: min_pixels 3136,
    # max_pixels 12845056 (the class default max is 28*28*1280), 14 px patches, merge 2.
    image_processor = Qwen2VLImageProcessorPil(min_pixels=3136, max_pixels=12845056,
                                               patch_size=14, temporal_patch_size=2,
                                               merge_size=2)
    processor = processor_cls(image_processor=image_processor, tokenizer=tok)
    config = config_cls(text_config=dict(vocab_size=len(tok)),
                        vision_config=dict(patch_size=14, spatial_merge_size=2), **token_ids(tok))
    return Released(processor, config)


def qwen2_vl() -> Released:
    from transformers import Qwen2VLConfig, Qwen2VLProcessor

    return _qwen(Qwen2VLProcessor, Qwen2VLConfig)


def qwen2_5_vl() -> Released:
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLProcessor

    return _qwen(Qwen2_5_VLProcessor, Qwen2_5_VLConfig)


def tiny_modules() -> dict[str, Any]:
    """The ``tests/tiny`` family modules that carry their own real-size builder
    (``released()``) and expected table (``REAL_SIZE``: (height, width) -> Expected);
    optionally ``REAL_SIZE_MULTI_IMAGE`` (the same for an image of a two-image prompt,
    where the processor treats it otherwise) and ``processor_image_mask(layout, inputs)``
    (where the processor marks image tokens other than by ``mm_token_type_ids``). A new
    family's tests live in its own files, so families can be added side by side.

    Not cached: a tiny module that imports this file is still half-imported while this
    file first runs, and must be found on a later call."""
    import importlib
    import pkgutil

    import tests.tiny as tiny

    modules = {}
    for info in pkgutil.iter_modules(tiny.__path__):
        if not info.name.startswith("_"):
            module = importlib.import_module(f"tests.tiny.{info.name}")
            if hasattr(module, "released"):
                modules[info.name] = module
    return modules


def tiny_module_tables() -> dict[str, dict]:
    """family -> its ``REAL_SIZE`` table, for the families whose tiny module has one."""
    return {name: module.REAL_SIZE for name, module in tiny_modules().items()}


class _Builders(dict):
    """The first nine families' builders, plus every tiny module's ``released``, looked up
    when asked (see :func:`tiny_modules`)."""

    def _all(self) -> dict[str, Callable[..., Released]]:
        return {**dict(self.items()),
                **{name: module.released for name, module in tiny_modules().items()}}

    def __getitem__(self, name: str) -> Callable[..., Released]:
        return self._all()[name]

    def __iter__(self):
        return iter(self._all())

    def __len__(self) -> int:
        return len(self._all())

    def __contains__(self, name: object) -> bool:
        return name in self._all()


BUILDERS: dict[str, Callable[..., Released]] = _Builders(
    {f.__name__: f for f in (chameleon, emu3, gemma3, janus, llava, llava_onevision, pixtral,
                             qwen2_vl, qwen2_5_vl)})
