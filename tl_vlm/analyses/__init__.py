"""The Narrow Gate analyses as hook functions.

Example:
    >>> from tl_vlm import analyses as A                                     # doctest: +SKIP
    >>> pos = batch.positions
    >>> hooks = A.knockout_hooks(model, batch, keys=pos.gate, queries=pos.all)
    >>> out = model.generate(batch, fwd_hooks=hooks, max_new_tokens=20)       # gate ablated
    >>> contrib = A.cross_modal_contribution(model, batches)                  # [layer, head, group]
    >>> res = A.patch_gate(model, source=batch_a, target=batch_b, layers=range(0, 32, 4))
    >>> sep = A.modality_separation(model, batches)                           # per-layer |cos|
    >>> lens = A.logit_lens(model, batch, pos.gate)                           # [layer, n, vocab]

Modules: :mod:`.knockout`, :mod:`.contribution`, :mod:`.patching`, :mod:`.geometry`,
:mod:`.logit_lens`, :mod:`.tl_patching` (``transformer_lens.patching`` on VLM batches).
"""

from tl_vlm.analyses.contribution import (
    DEFAULT_GROUPS,
    ContributionAccumulator,
    CrossModalContribution,
    contribution_hooks,
    cross_modal_contribution,
)
from tl_vlm.analyses.geometry import (
    ModalitySeparation,
    NeighbourhoodOverlap,
    modality_separation,
    neighbourhood_overlap,
)
from tl_vlm.analyses.knockout import (
    gate_knockout,
    image_to_text_knockout,
    knockout_hooks,
    last_layers,
    random_image_knockout,
    resolve_layers,
)
from tl_vlm.analyses.logit_lens import LogitLensResult, head_logit_attribution, logit_lens
from tl_vlm.analyses.patching import PatchingResult, patch_gate, patch_hooks, patch_positions
from tl_vlm.analyses.tl_patching import batch_inputs, run_patching

__all__ = [
    "DEFAULT_GROUPS", "ContributionAccumulator", "CrossModalContribution", "contribution_hooks",
    "cross_modal_contribution",
    "ModalitySeparation", "NeighbourhoodOverlap", "modality_separation", "neighbourhood_overlap",
    "gate_knockout", "image_to_text_knockout", "knockout_hooks", "last_layers",
    "random_image_knockout", "resolve_layers",
    "LogitLensResult", "head_logit_attribution", "logit_lens",
    "PatchingResult", "patch_gate", "patch_hooks", "patch_positions",
    "batch_inputs", "run_patching",
]
