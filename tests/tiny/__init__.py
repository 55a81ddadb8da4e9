"""Tiny random VLMs, one builder per family, saved like real checkpoints.

Every test loads these through the public ``HookedVLM.from_pretrained(path)``; the
session-scoped ``tiny_zoo`` fixture (conftest.py) builds each family once per run.
A family module here defines ``SPEC = TinySpec(...)``; ``SPECS`` collects them.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers

WORDS = ("what is this describe the image a cat dog red blue green shape colour where "
         "left right top bottom answer question USER: ASSISTANT: yes no one two").split()


def make_tokenizer(specials: Sequence[str], words: Sequence[str] = WORDS, *,
                   bos: str = "<s>", eos: str = "</s>", pad: str = "<pad>", unk: str = "<unk>",
                   extra_vocab: Sequence[str] = (), **tokenizer_kwargs: Any):
    """A whitespace word-level fast tokenizer with the family's special tokens."""
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {}
    for tok in [unk, bos, eos, pad, *specials, *words, *extra_vocab]:
        vocab.setdefault(tok, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unk))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=bos, eos_token=eos,
                                  pad_token=pad, unk_token=unk, **tokenizer_kwargs)
    tok.add_special_tokens({"additional_special_tokens": list(specials)})
    return tok


def make_sentencepiece_tokenizer(specials: Sequence[str], words: Sequence[str] = WORDS, *,
                                 extra_pieces: Sequence[str] = (), **tokenizer_kwargs: Any):
    """A Llama-style fast tokenizer: unigram pieces with a prepended ``"▁"`` (SentencePiece's
    space), so ``" cat"`` tokenizes as ``["▁", "▁cat"]`` as with LLaVA-1.5's Vicuna tokenizer."""
    import string

    from tokenizers import decoders, normalizers, processors
    from transformers import PreTrainedTokenizerFast

    pieces = {tok: 0.0 for tok in ["<unk>", "<s>", "</s>", "<pad>", *specials]}
    pieces.update({f"▁{w}": -1.0 for w in words})
    pieces.update({p: -2.0 for p in extra_pieces})
    pieces.update({"▁": -5.0, **{c: -8.0 for c in string.ascii_letters + string.digits + ":-?."}})
    backend = Tokenizer(models.Unigram(list(pieces.items()), unk_id=0))
    # As Llama's tokenizer.json: prepend "▁", spaces become "▁", BOS added by a template.
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"),
                                               normalizers.Replace(" ", "▁")])
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.Fuse(),
                                         decoders.Strip(content=" ", left=1)])
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                  pad_token="<pad>", unk_token="<unk>", **tokenizer_kwargs)
    tok.add_special_tokens({"additional_special_tokens": list(specials)})
    return tok


def image(seed: int, size: tuple[int, int] = (20, 24)) -> Image.Image:
    """A random RGB image (height, width)."""
    rng = np.random.RandomState(seed)
    return Image.fromarray((rng.rand(size[0], size[1], 3) * 255).astype("uint8"))


def tiny_checkpoint(family_module: Any, root: Any = None) -> str:
    """Build a tiny random checkpoint with a ``tests/tiny`` family module (its ``build``),
    saved like a real one; returns its directory. The tutorials in ``docs/`` use it.
    transformers' "Writing model shards" bars are off: noise for a model this small."""
    import tempfile

    import torch
    from transformers.utils import logging as hf_logging

    path = Path(root or tempfile.mkdtemp()) / family_module.__name__.rsplit(".", 1)[-1]
    path.mkdir(parents=True)
    torch.manual_seed(0)
    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        family_module.build(path)
    finally:
        if was_on:
            hf_logging.enable_progress_bar()
    return str(path)


@dataclass
class TinySpec:
    """How to build and exercise one family's tiny model.

    Attributes:
        family: tl_vlm family name.
        build: writes model, tokenizer and processor into the given directory.
        hf_class: name of the transformers class used as numerical reference.
        prompts, images: a batch of two prompts of different lengths (one with two
            images where the family allows it); ``images`` follows ``HookedVLM.prepare``.
        other_images: same structure, different pictures (to show images matter).
        multi_image: whether one prompt may hold two images.
        generated_token_inputs: the value a per-token input other than ``input_ids``
            takes on a generated token, where it is not 0 (``attention_mask`` is 1), as
            the HF model's ``generate`` extends it (PaliGemma: ``token_type_ids`` 1, the
            causal suffix).
        image_entry_hooks: hook points besides ``blocks.0.hook_resid_pre`` through which
            image information is added to the residual stream, each ``[batch, pos,
            d_model]`` (Qwen3-VL's DeepStack terms ``blocks.{k}.deepstack.hook_out``); a
            test that patches the model's whole input patches these too.
    """

    family: str
    build: Callable[[Path], None]
    hf_class: str
    prompts: list[str]
    images: list[Any]
    other_images: list[Any]
    multi_image: bool = True
    notes: str = field(default="")
    generated_token_inputs: dict[str, int] = field(default_factory=dict)
    image_entry_hooks: tuple[str, ...] = ()


def specs() -> dict[str, TinySpec]:
    """Every module of this package defines one family's SPEC."""
    names = sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))
    return {n: importlib.import_module(f"{__name__}.{n}").SPEC for n in names}
