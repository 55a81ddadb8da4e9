"""HookedVLM: a TransformerBridge that takes images.

Example (the shipped toy model writes its image as tokens, so it needs no pixels):
    >>> from tl_vlm import HookedVLM
    >>> from tl_vlm.toy import make_examples
    >>> model = HookedVLM.from_pretrained("toy-gated")
    >>> batch = model.prepare(make_examples(3).prompts, padding_side="left")
    >>> logits, cache = model.run_with_cache(batch)
    >>> logits.shape, batch.positions.gate.tolist()
    (torch.Size([3, 46, 54]), [[38], [38], [41]])
    >>> cache["blocks.3.attn.hook_pattern"].shape           # [batch, head, query, key]
    torch.Size([3, 4, 46, 46])

A real checkpoint goes through the same code:
    >>> model = HookedVLM.from_pretrained("facebook/chameleon-7b")     # doctest: +SKIP
    >>> batch = model.prepare(["What animal is this?"], images=[img])  # doctest: +SKIP
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence, Union

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens.model_bridge import TransformerBridge

from tl_vlm.core import registration
from tl_vlm.core.devices import resolve_dtype
from tl_vlm.core.progress import quiet_hub_bars_in_bare_notebooks
from tl_vlm.core.family import Family, family_for_config
from tl_vlm.core.batch import VLMBatch
from tl_vlm.core.layout import ImageLayout, LayoutError
from tl_vlm.core.loading import check_placement, load_processor, offline_if_local, resolve_model_name

ImageInput = Any  # a PIL image, an array, or anything the family's processor takes


def _cache_kwarg() -> str:
    """``generate``'s name for a cache object: ``cache`` (``past_key_values`` is deprecated
    in recent transformers and warns on every call)."""
    from transformers.generation import utils

    return "cache" if "cache" in getattr(utils, "ALL_CACHE_NAMES", ()) else "past_key_values"


_CACHE_KWARG = _cache_kwarg()


def _generation_cache(hf_model: Any) -> Any:
    """The cache ``generate`` runs with: a full-length key/value cache on every attention
    layer, sliding-window ones included, so that on cached steps key index == sequence
    position for position-based hooks. Layers that keep a recurrent state instead of keys
    and values (LFM2's short convolutions) get the cache layer transformers builds for
    them from the config; a decoder without such layers gets a plain ``DynamicCache()``."""
    from transformers import DynamicCache
    from transformers.cache_utils import DummyLayer, DynamicLayer, DynamicSlidingWindowLayer

    built = DynamicCache(config=hf_model.config)
    if all(isinstance(layer, (DynamicLayer, DummyLayer)) for layer in built.layers):
        return DynamicCache()
    built.layers = [DynamicLayer() if type(layer) is DynamicSlidingWindowLayer else layer
                    for layer in built.layers]
    return built


def _bos_eos(tokenizer: Any) -> tuple[bool, bool]:
    """Whether the tokenizer prepends BOS and appends EOS to a plain text."""
    ids = tokenizer.encode("a")
    prepends = len(ids) > 1 and tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id
    appends = len(ids) > 1 and tokenizer.eos_token_id is not None and ids[-1] == tokenizer.eos_token_id
    return prepends, appends


@dataclass
class GenerationOutput:
    """Tokens produced by :meth:`HookedVLM.generate`.

    Example:
        >>> from tl_vlm import HookedVLM
        >>> from tl_vlm.toy import make_examples
        >>> model = HookedVLM.from_pretrained("toy-gated")
        >>> out = model.generate(model.prepare(make_examples(3).prompts, padding_side="left"),
        ...                      max_new_tokens=2)
        >>> out.text, out.new_tokens.shape, out.logits.shape    # logits of each new token
        (['red', 'square', 'top-left'], torch.Size([3, 2]), torch.Size([3, 2, 54]))
        >>> out
        GenerationOutput(3 sequences, 2 new tokens each; text=['red', 'square', 'top-left']; .sequences, .logits, .new_tokens)
    """

    sequences: Int[Tensor, "batch total_pos"]
    logits: Float[Tensor, "batch new_pos vocab"]
    prompt_length: int
    text: list[str]

    @property
    def new_tokens(self) -> Int[Tensor, "batch new_pos"]:
        return self.sequences[:, self.prompt_length:]

    def __repr__(self) -> str:
        shown = self.text[:4] + (["..."] if len(self.text) > 4 else [])
        return (f"GenerationOutput({len(self.text)} sequences, {self.new_tokens.shape[1]} new "
                f"tokens each; text={shown!r}; .sequences, .logits, .new_tokens)")


def _refuse_prompts(value: Any, method: str) -> None:
    """Prompts where a batch belongs: say to call ``prepare`` (which renders the images)."""
    if isinstance(value, str) or (isinstance(value, (list, tuple)) and value
                                  and all(isinstance(v, str) for v in value)):
        raise TypeError(f"{method} takes a batch, not prompts: batch = model.prepare(prompts, "
                        f"images=...), then {method.replace('()', '(batch)').replace('(...)', '(batch)')}")


class HookedVLM(TransformerBridge):
    """A TransformerLens bridge over a vision-language model.

    Everything TransformerBridge offers (``run_with_cache``, ``run_with_hooks``,
    ``hooks()``, hook names such as ``blocks.{i}.attn.hook_pattern``) takes a
    :class:`~tl_vlm.core.batch.VLMBatch` as input, and every attention hook is live (edits
    change the output) on every family.

    Example:
        >>> from tl_vlm import HookedVLM
        >>> model = HookedVLM.from_pretrained("toy-gated")
        >>> model.family.name, model.cfg.n_layers, model.layout.gate_description
        ('chameleon', 4, 'EOI <eoss>')
    """

    family: Family
    layout: ImageLayout

    # -- loading -------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        dtype: Union[str, torch.dtype] = torch.float32,
        device: Union[str, torch.device, None] = None,
        *,
        device_map: Union[str, dict, None] = None,
        n_devices: Optional[int] = None,
        max_memory: Optional[dict] = None,
        offload_folder: Optional[str] = None,
        processor: Any = None,
        trust_remote_code: bool = False,
        **boot_kwargs: Any,
    ) -> "HookedVLM":
        """Load a hub id, a local directory (safetensors) or a shipped toy model
        (``"toy-gated"``, ``"toy-distributed"``) with hooks on every layer.

        Args:
            dtype: a torch dtype or its name ("bfloat16"/"bf16", "float16"/"fp16",
                "float32"/"fp32").
            device: one device for the whole model ("cpu", "cuda", "cuda:1"; default
                "cpu"). Not together with a device map.
            device_map: split the model over devices, as in transformers: "auto",
                "balanced", or a ``{module path: device}`` dict; "cpu" and "disk"
                (accelerate offload, with ``offload_folder``) are allowed, but TL
                refuses a map that mixes GPUs with CPU/disk offload.
            n_devices: spread the layers over this many GPUs (cuda:0..n-1).
            max_memory: per-device budgets for "auto"/"balanced", e.g.
                ``{0: "70GiB", 1: "70GiB"}``.
            processor: a processor object, or a hub id / path to load it from, for
                checkpoints saved without one.

        Example:
            >>> model = HookedVLM.from_pretrained("toy-distributed")
            >>> type(model.hf_model).__name__, model.cfg.dtype
            ('ChameleonForConditionalGeneration', torch.float32)
            >>> HookedVLM.from_pretrained("toy-gated", dtype="bf16").cfg.dtype
            torch.bfloat16
            >>> model = HookedVLM.from_pretrained("llava-hf/llava-1.5-7b-hf",  # doctest: +SKIP
            ...                                   dtype="bfloat16", device="cuda")  # doctest: +SKIP
            >>> model = HookedVLM.from_pretrained("facebook/chameleon-30b",    # doctest: +SKIP
            ...                                   dtype="bfloat16", n_devices=2)  # doctest: +SKIP
        """
        from transformers import AutoConfig

        dtype = resolve_dtype(dtype)
        device = check_placement(device, device_map, n_devices, max_memory, offload_folder)
        name_or_path = resolve_model_name(name_or_path)
        with offline_if_local(name_or_path), quiet_hub_bars_in_bare_notebooks():
            hf_config = AutoConfig.from_pretrained(name_or_path,
                                                   trust_remote_code=trust_remote_code)
            family = family_for_config(hf_config)
            processor = load_processor(name_or_path, processor, trust_remote_code)
            # The layout reads the processor before any weight is read: a layout that
            # cannot place the images (the generic path's refusals) fails here.
            layout = family.layout(processor, hf_config)
            arch = next(a for a in hf_config.architectures if a in family.architectures)
            placement = dict(device_map=device_map, n_devices=n_devices, max_memory=max_memory,
                             offload_folder=offload_folder)
            with registration.adapter_override(arch, family.adapter):
                bridge = TransformerBridge.boot_transformers(
                    name_or_path, dtype=dtype, device=device,
                    # TL's own copy of the processor's tokenizer (TL adjusts its BOS and
                    # padding), so a checkpoint saved without tokenizer files loads too.
                    tokenizer=copy.deepcopy(getattr(processor, "tokenizer", processor)),
                    trust_remote_code=trust_remote_code,
                    **{k: v for k, v in placement.items() if v is not None}, **boot_kwargs,
                )
        bridge.__class__ = cls
        # TL boots HF configs with output_attentions=True, which keeps every layer's
        # pattern alive to the end of each pass; tl_vlm's hooks fire without it.
        bridge.original_model.config.output_attentions = False
        for sub in ("text_config",):
            if hasattr(bridge.original_model.config, sub):
                getattr(bridge.original_model.config, sub).output_attentions = False
        bridge.processor = processor
        # One tokenizer for users: model.tokenizer is the processor's own. TL's setter
        # re-configures a tokenizer that replaces another (forcing a BOS), but takes a
        # first one as it is: so the old one is cleared first.
        tokenizer = getattr(processor, "tokenizer", None)
        if tokenizer is not None:
            bridge.tokenizer = None
            bridge.tokenizer = tokenizer
            bridge.cfg.tokenizer_prepends_bos, bridge.cfg.tokenizer_appends_eos = \
                _bos_eos(tokenizer)
        bridge.family = family
        layout.config = bridge.original_model.config   # the loaded model's own config
        bridge.layout = layout
        bridge.eval()
        return bridge

    @property
    def device_map(self) -> Optional[dict[str, Any]]:
        """Where each part of the model sits (``hf_device_map``), or None on one device."""
        return getattr(self.original_model, "hf_device_map", None)

    @property
    def hf_model(self) -> torch.nn.Module:
        """The wrapped Hugging Face model (the reference the bridge must equal)."""
        return self.original_model

    # -- inputs --------------------------------------------------------------
    def prepare(
        self,
        prompts: Union[str, Sequence[str]],
        images: Union[None, ImageInput, Sequence[Union[ImageInput, Sequence[ImageInput], None]]] = None,
        padding_side: Optional[str] = None,
        **processor_kwargs: Any,
    ) -> VLMBatch:
        """Process prompts and images into a batch with its :class:`ImagePositions`.

        ``images[i]`` is the image (or list of images) of ``prompts[i]``. A prompt
        without the family's image placeholder gets its images placed before the
        text (the paper's image-then-text layout); a prompt with placeholders must
        have exactly one image per placeholder.

        Example:
            >>> from tl_vlm.toy import make_examples
            >>> model = HookedVLM.from_pretrained("toy-gated")
            >>> batch = model.prepare(make_examples(2).prompts, padding_side="right")
            >>> pos = batch.positions
            >>> pos.boi.tolist(), pos.gate.tolist(), pos.image.counts.tolist()
            ([[1], [1]], [[38], [38]], [36, 36])
            >>> batch = model.prepare(["What animal is this?", "Describe it."],  # doctest: +SKIP
            ...                       images=[img_a, img_b], padding_side="left")  # doctest: +SKIP
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        per_prompt = self._images_per_prompt(prompts, images)
        texts = [self.layout.with_placeholders(p, len(imgs)) for p, imgs in zip(prompts, per_prompt)]
        tokenizer = self.layout.tokenizer
        side = padding_side or tokenizer.padding_side
        if side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}")
        saved_side = tokenizer.padding_side
        tokenizer.padding_side = side
        try:
            # The side goes to the processor too: some pin their own (Llama 4: left).
            kwargs = dict(text=texts, return_tensors="pt", padding=True, padding_side=side,
                          **processor_kwargs)
            if any(per_prompt):
                kwargs["images"] = self.layout.processor_images(per_prompt)
            inputs = dict(self.processor(**kwargs))
        finally:
            tokenizer.padding_side = saved_side
        positions = self.layout.locate(inputs["input_ids"], inputs.get("attention_mask"), inputs)
        for b, (prompt, imgs) in enumerate(zip(prompts, per_prompt)):
            expected = len(imgs) + self.layout.pretokenised_images(prompt)
            if positions.n_images(b) != expected:
                raise LayoutError(
                    f"prompt {b} was given {len(imgs)} image(s) (plus "
                    f"{expected - len(imgs)} written as tokens, per "
                    f"ImageLayout.pretokenised_images) but its token ids hold "
                    f"{positions.n_images(b)}"
                )
        # Pixels in the model's dtype: a bf16 VQ encoder or vision tower refuses float32.
        return VLMBatch(inputs, positions, prompts).to(self.cfg.device, dtype=self.dtype)

    @staticmethod
    def _images_per_prompt(prompts: list[str], images: Any) -> list[list[Any]]:
        if images is None:
            return [[] for _ in prompts]
        if not isinstance(images, (list, tuple)):
            images = [images]
        if len(images) != len(prompts):
            raise ValueError(
                f"got {len(images)} image entries for {len(prompts)} prompts; pass one entry "
                f"per prompt (an image, a list of images, or None)"
            )
        return [[] if im is None else list(im) if isinstance(im, (list, tuple)) else [im]
                for im in images]

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the model computes in (its input embedding's)."""
        return self.hf_model.get_input_embeddings().weight.dtype

    # -- running -------------------------------------------------------------
    def forward(self, input: Any, *args: Any, **kwargs: Any) -> Any:
        """TransformerBridge.forward, also taking a VLMBatch or a processor output.

        Token ids that hold image placeholders but come without pixels are refused: the
        model would silently run text-only (the placeholders embedded as plain tokens).
        """
        if isinstance(input, VLMBatch):
            input = input.inputs
        _refuse_prompts(input, "model(...)")
        if isinstance(input, Mapping):
            merged = {k: v for k, v in input.items() if k != "input_ids"}
            merged.update(kwargs)
            return super().forward(input["input_ids"], *args, **merged)
        self._refuse_text_only(input, kwargs)
        return super().forward(input, *args, **kwargs)

    def _refuse_text_only(self, tokens: Any, kwargs: Mapping[str, Any]) -> None:
        if not isinstance(tokens, Tensor) or tokens.is_floating_point():
            return
        if any(kwargs.get(k) is not None for k in self.layout.image_input_names) \
                or kwargs.get("inputs_embeds") is not None:
            return
        if self.layout.holds_placeholders(tokens):
            raise ValueError(
                f"the model was called with token ids {tuple(tokens.shape)} that hold image "
                f"placeholders ({self.layout.content_token!r}) but no pixels, so it would run "
                f"text-only. Pass the VLMBatch itself (model(batch), "
                f"model.run_with_cache(batch), ...), or, for transformer_lens.patching helpers "
                f"that pass token ids, wrap the call in `with tl_vlm.analyses.batch_inputs(model, "
                f"batch):`"
            )

    def answer_tokens(self, answers: Union[str, Sequence[str]]) -> Int[Tensor, "n"]:
        """The token that stands for each answer word, by tl_vlm's one policy (the first
        token carrying the word after a space; see :mod:`tl_vlm.core.answers`). Use it rather
        than ``model.tokenizer(word)["input_ids"][0]``, which is BOS for most tokenizers.

        Example:
            >>> model = HookedVLM.from_pretrained("toy-gated")
            >>> model.answer_tokens(["red", "blue"]).tolist(), model.tokenizer is model.layout.tokenizer
            ([18, 20], True)
        """
        from tl_vlm.core.answers import answer_token_ids

        return answer_token_ids(self.tokenizer, [answers] if isinstance(answers, str) else answers)

    def last_logits(self, batch: VLMBatch, fwd_hooks: Sequence[tuple[Any, Any]] = (),
                    **forward_kwargs: Any) -> Float[Tensor, "batch vocab"]:
        """Next-token logits at each example's last position, computing only those rows
        of the unembedding (never ``[batch, pos, vocab]``), with ``fwd_hooks`` active.

        Example:
            >>> from tl_vlm.toy import make_examples
            >>> model = HookedVLM.from_pretrained("toy-gated")
            >>> batch = model.prepare(make_examples(3).prompts, padding_side="right")
            >>> last = model.last_logits(batch)
            >>> last.shape, torch.equal(last, model(batch)[batch.positions.last.mask])
            (torch.Size([3, 54]), True)
        """
        _refuse_prompts(batch, "last_logits()")
        if not isinstance(batch, VLMBatch):
            raise TypeError(f"last_logits() takes a VLMBatch from model.prepare(...), got "
                            f"{type(batch).__name__}")
        with self.hooks(fwd_hooks=list(fwd_hooks)):
            logits = self(batch, logits_to_keep=batch.logits_to_keep, **forward_kwargs)
        return batch.last_of(logits)

    def run_with_cache(self, *args: Any, query_chunk: Optional[int] = None,
                       **kwargs: Any) -> Any:
        """TransformerBridge.run_with_cache; ``query_chunk=N`` builds cached attention
        patterns N query rows at a time (see :func:`tl_vlm.core.attention.eager_query_chunks`):
        for long sequences, the full pattern you asked for without the float32
        full-size temporaries of a one-shot softmax.

        Example:
            >>> from tl_vlm.toy import make_examples
            >>> model = HookedVLM.from_pretrained("toy-gated")
            >>> batch = model.prepare(make_examples(2).prompts)
            >>> _, cache = model.run_with_cache(batch, names_filter="blocks.0.attn.hook_pattern",
            ...                                 query_chunk=16)
            >>> cache["blocks.0.attn.hook_pattern"].shape
            torch.Size([2, 4, 46, 46])
        """
        from tl_vlm.core.attention import eager_query_chunks

        with eager_query_chunks(query_chunk):
            return super().run_with_cache(*args, **kwargs)

    def run_from_layer(
        self,
        batch: VLMBatch,
        layer: int,
        resid: Float[Tensor, "batch pos d_model"],
        fwd_hooks: Sequence[tuple[Any, Any]] = (),
        **forward_kwargs: Any,
    ) -> Any:
        """Forward from block ``layer`` on the residual ``resid``; blocks before it never run.

        Masks, position ids (M-RoPE included) and image metadata come from the batch as
        in a full forward. See :func:`tl_vlm.core.prefix.run_from_layer`.

        Example:
            >>> from tl_vlm.toy import make_examples
            >>> model = HookedVLM.from_pretrained("toy-gated")
            >>> batch = model.prepare(make_examples(3).prompts)
            >>> logits, cache = model.run_with_cache(batch, names_filter="blocks.2.hook_resid_pre")
            >>> same = model.run_from_layer(batch, 2, cache["blocks.2.hook_resid_pre"])
            >>> torch.equal(same, logits)
            True
        """
        from tl_vlm.core.prefix import run_from_layer

        return run_from_layer(self, batch, layer, resid, fwd_hooks=fwd_hooks, **forward_kwargs)

    @torch.no_grad()
    def generate(  # type: ignore[override]
        self,
        batch: VLMBatch,
        max_new_tokens: int = 20,
        fwd_hooks: Sequence[tuple[Any, Any]] = (),
        do_sample: bool = False,
        **generate_kwargs: Any,
    ) -> GenerationOutput:
        """Greedy (by default) generation with images, hooks active on every step.

        Hooks stay on for the prompt pass and every cached step; on cached steps
        ``hook_pattern`` is ``[batch, head, new_q, all_k]``.

        Example:
            >>> from tl_vlm import analyses as A
            >>> from tl_vlm.toy import make_examples
            >>> model = HookedVLM.from_pretrained("toy-gated")
            >>> batch = model.prepare(make_examples(3).prompts, padding_side="left")
            >>> model.generate(batch, max_new_tokens=1).text
            ['red', 'square', 'top-left']
            >>> model.generate(batch, max_new_tokens=1,
            ...                fwd_hooks=A.gate_knockout(model, batch)).text   # blind
            ['', 'square', 'top-right']
        """
        _refuse_prompts(batch, "generate()")
        if not isinstance(batch, VLMBatch):
            raise TypeError(f"generate() takes a VLMBatch from model.prepare(...), got "
                            f"{type(batch).__name__}")
        if batch.padding_side == "right":
            raise ValueError(
                "batched generation needs left padding: model.prepare(..., padding_side='left')"
            )
        tokenizer = self.layout.tokenizer
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if not {"cache", "past_key_values", "cache_implementation"} & set(generate_kwargs):
            generate_kwargs[_CACHE_KWARG] = _generation_cache(self.hf_model)
        with self.hooks(fwd_hooks=list(fwd_hooks)):
            out = self.hf_model.generate(
                **batch.inputs, max_new_tokens=max_new_tokens, do_sample=do_sample,
                pad_token_id=pad, return_dict_in_generate=True, output_logits=True,
                **generate_kwargs,
            )
        prompt_length = batch.input_ids.shape[1]
        sequences = out.sequences
        text = tokenizer.batch_decode(sequences[:, prompt_length:], skip_special_tokens=True)
        return GenerationOutput(sequences, torch.stack(out.logits, dim=1), prompt_length, text)
