"""The Narrow Gate analyses as hook functions.

Example:
    >>> from tl_vlm import HookedVLM, analyses as A
    >>> from tl_vlm.toy import make_pairs
    >>> model = HookedVLM.from_pretrained("toy-gated")
    >>> pairs = make_pairs(24, seed=0)
    >>> batch_a = model.prepare([p.source.prompt for p in pairs], padding_side="left")
    >>> batch_b = model.prepare([p.target.prompt for p in pairs], padding_side="left")
    >>> pos = batch_b.positions
    >>> hooks = A.knockout_hooks(model, batch_b, keys=pos.gate, queries=pos.all)
    >>> out = model.generate(batch_b, fwd_hooks=hooks, max_new_tokens=1)     # gate ablated
    >>> contrib = A.cross_modal_contribution(model, [batch_a, batch_b])       # [layer, head, group]
    >>> [round(s, 3) for s in contrib.share("eoi").tolist()]                # all through EOI
    [1.0, 1.0, 1.0, 1.0]
    >>> res = A.patch_gate(model, source=batch_a, target=batch_b, stream="attn_in",
    ...                    answers=[(p.source.answer, p.target.answer) for p in pairs])
    >>> res.flip_rate[0].item()                                               # steered
    1.0
    >>> lens = A.logit_lens(model, batch_b, pos.gate)
    >>> lens.logits.shape                                                     # [layer, n, vocab]
    torch.Size([4, 24, 54])

Modules: :mod:`.knockout`, :mod:`.contribution`, :mod:`.patching`, :mod:`.geometry`,
:mod:`.logit_lens`, :mod:`.image_lens` (the lens over the image tokens, projecting words
out), :mod:`.sinks` (image-side attention sinks), :mod:`.tl_patching`
(``transformer_lens.patching`` on VLM batches),
:mod:`.gates` (find the gate in any model: :func:`find_gates`).
"""

from tl_vlm.analyses.contribution import (
    DEFAULT_GROUPS,
    ContributionAccumulator,
    CrossModalContribution,
    contribution_hooks,
    cross_modal_contribution,
)
from tl_vlm.analyses.flow import DEFAULT_EDGES, FlowMap, flow_map
from tl_vlm.analyses.generation_attention import GenerationAttention, attention_over_generation
from tl_vlm.analyses.gates import (GateCandidate, GateCheck, GateCost, GateMetric, GateSearch,
                                  GateSearchConfig, LayerSweep, find_gates)
from tl_vlm.analyses.geometry import (
    ModalitySeparation,
    NeighbourhoodOverlap,
    modality_separation,
    neighbourhood_overlap,
    neighbourhood_overlaps,
)
from tl_vlm.analyses.knockout import (
    gate_knockout,
    image_to_text_knockout,
    knockout_hooks,
    last_layers,
    progressive_widths,
    random_image_knockout,
    resolve_layers,
)
from tl_vlm.analyses.image_lens import ImageLensResult, image_logit_lens, project_away, tokens_in_box
from tl_vlm.analyses.logit_lens import LogitLensResult, head_logit_attribution, logit_lens
from tl_vlm.analyses.patching import PatchingResult, patch_gate, patch_hooks, patch_positions
from tl_vlm.analyses.sinks import AttentionSinks, attention_sinks, sink_knockout
from tl_vlm.analyses.tl_patching import batch_inputs, run_patching

__all__ = [
    "DEFAULT_GROUPS", "ContributionAccumulator", "CrossModalContribution", "contribution_hooks",
    "cross_modal_contribution",
    "GateCandidate", "GateCheck", "GateCost", "GateMetric", "GateSearch", "GateSearchConfig",
    "LayerSweep", "find_gates",
    "DEFAULT_EDGES", "FlowMap", "flow_map",
    "GenerationAttention", "attention_over_generation",
    "ModalitySeparation", "NeighbourhoodOverlap", "modality_separation", "neighbourhood_overlap",
    "neighbourhood_overlaps",
    "gate_knockout", "image_to_text_knockout", "knockout_hooks", "last_layers", "progressive_widths",
    "random_image_knockout", "resolve_layers",
    "LogitLensResult", "head_logit_attribution", "logit_lens",
    "ImageLensResult", "image_logit_lens", "project_away", "tokens_in_box",
    "AttentionSinks", "attention_sinks", "sink_knockout",
    "PatchingResult", "patch_gate", "patch_hooks", "patch_positions",
    "batch_inputs", "run_patching",
]
