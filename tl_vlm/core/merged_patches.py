"""The layout of families that write an image as BOI + merged patches + EOI, with the
patch grid in the processor's ``image_grid_thw`` (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, GLM-4V).

A family sets its token strings and :attr:`MergedPatchLayout.config_token_ids` (which
config ids name them); the grid is ``t * h / merge`` rows of ``w / merge`` tokens.

Example:
    >>> MergedPatchLayout.config_token_ids
    {'boi_token': 'vision_start_token_id', 'eoi_token': 'vision_end_token_id'}
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Optional

from tl_vlm.core.layout import ImageLayout, LayoutError


class MergedPatchLayout(ImageLayout):
    """BOI + rows x cols content tokens + EOI, the grid from ``image_grid_thw`` divided by
    the vision config's ``spatial_merge_size``. A prompt marks an image with
    BOI + content + EOI; a bare content token is wrapped in BOI/EOI, since the model
    always sees images between them.

    Example:
        >>> from tl_vlm.adapters.qwen2_vl import Qwen2VLLayout
        >>> issubclass(Qwen2VLLayout, MergedPatchLayout)
        True
    """

    #: layout attribute -> config key holding the id the model uses (read over the
    #: class strings, so a checkpoint that renames its tokens is still located right)
    config_token_ids: dict[str, str] = {"boi_token": "vision_start_token_id",
                                        "eoi_token": "vision_end_token_id"}
    native = False
    processor_counted = ("image",)

    def __init__(self, processor: Any, config: Any) -> None:
        super().__init__(processor, config)
        for attr, key in self.config_token_ids.items():
            tid = getattr(config, key, None)
            if tid is not None:
                tok = self.tokenizer.convert_ids_to_tokens(int(tid))
                if tok is not None:
                    setattr(self, attr, tok)
        self.placeholder = self.boi_token + self.content_token + self.eoi_token
        self.merge = int(config.vision_config.spatial_merge_size)

    def image_grids(self, inputs: Mapping[str, Any]) -> Optional[list[tuple[int, int]]]:
        thw = inputs.get("image_grid_thw")
        if thw is None:
            return []
        grids = []
        for n, (t, h, w) in enumerate(thw.tolist()):
            if h % self.merge or w % self.merge:
                raise LayoutError(
                    f"image {n}: image_grid_thw {(t, h, w)} is not divisible by "
                    f"spatial_merge_size {self.merge}"
                )
            grids.append((t * h // self.merge, w // self.merge))
        return grids

    def count_placeholders(self, prompt: str) -> int:
        return prompt.count(self.content_token)

    def with_placeholders(self, prompt: str, n_images: int) -> str:
        prompt = super().with_placeholders(prompt, n_images)
        pad, boi, eoi = map(re.escape, (self.content_token, self.boi_token, self.eoi_token))
        bare = re.compile(f"(?<!{boi}){pad}(?!{eoi})")
        return bare.sub(lambda _: self.placeholder, prompt)
