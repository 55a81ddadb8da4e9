"""The Narrow Gate analyses as hook functions.

Example:
    >>> from tl_vlm import analyses as A                                     # doctest: +SKIP
    >>> hooks = A.knockout_hooks(model, batch, keys=batch.positions.gate)
    >>> out = model.generate(batch, fwd_hooks=hooks, max_new_tokens=20)
"""

from tl_vlm.analyses.knockout import (
    gate_knockout,
    image_to_text_knockout,
    knockout_hooks,
    last_layers,
    random_image_knockout,
    resolve_layers,
)

__all__ = [
    "gate_knockout",
    "image_to_text_knockout",
    "knockout_hooks",
    "last_layers",
    "random_image_knockout",
    "resolve_layers",
]
