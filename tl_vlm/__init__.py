"""tl_vlm: TransformerLens for vision-language models.

Load a VLM with hooks on every layer, find its image tokens, and run the Narrow Gate
analyses as hook functions.

Example:
    >>> import tl_vlm
    >>> model = tl_vlm.HookedVLM.from_pretrained("toy-gated")        # shipped, offline
    >>> batch = model.prepare(tl_vlm.toy.make_examples(2).prompts)
    >>> logits, cache = model.run_with_cache(batch)
    >>> batch.positions.gate.tolist()
    [[38], [38]]
    >>> model = tl_vlm.HookedVLM.from_pretrained("facebook/chameleon-7b")  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from typing import Any

from tl_vlm.core.version import __version__  # noqa: E402,F401

from tl_vlm.core.progress import quiet_tqdm_widget_warning  # noqa: E402

quiet_tqdm_widget_warning()   # before transformers imports tqdm.auto

# Attribute -> module. Imported on first use so that the start-up hook
# (tl_vlm._autoload, run from a .pth file) never pulls in torch.
_LAZY = {
    "HookedVLM": "tl_vlm.core.model",
    "GenerationOutput": "tl_vlm.core.model",
    "VLMBatch": "tl_vlm.core.batch",
    "ImagePositions": "tl_vlm.core.positions",
    "PositionSet": "tl_vlm.core.positions",
    "ImageLayout": "tl_vlm.core.layout",
    "LayoutError": "tl_vlm.core.layout",
    "UnsupportedModelError": "tl_vlm.core.family",
    "families": "tl_vlm.core.family",
    "patch_transformer_lens": "tl_vlm.core.registration",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        if not _registered:
            _register()
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module 'tl_vlm' has no attribute {name!r}")


_registered = False


def _register() -> None:
    global _registered
    from tl_vlm.core import registration

    registration.ensure_registered()
    _registered = True
