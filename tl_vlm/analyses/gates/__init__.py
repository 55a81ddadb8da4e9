"""Find the gate: which image-side positions carry the image to the text, how narrowly, where.

The Narrow Gate paper asks of each model whether the image reaches the text through
EOI. :func:`find_gates` asks the question without the guess: it knocks out every position
class the layout defines (BOI, the first and last image token, all content tokens, EOI,
row breaks, each image row, ...; exact, one forward each), estimates the knockout of
every single image-side position from one backward pass (attribution patching on the
SDPA kernel), refines and checks the estimates by exact knockouts, and says whether the
image goes through one or two positions (``narrow``), many (``distributed``) or in
between (``mixed``), and from which layer on. Effects are drops of the answer's
log-odds (:class:`GateMetric`); shares are effects over the whole image side's.

Modules: :mod:`.config` (:class:`GateSearchConfig`, the options), :mod:`.candidates`
(classes and single positions), :mod:`.metric` (the score), :mod:`.search` (the
passes; the estimate), :mod:`.verdict`, :mod:`.result` and :mod:`.records` (what was
found: :class:`GateSearch`, :class:`GateCandidate`, :class:`GateCheck`,
:class:`GateCost`, :class:`LayerSweep`), :mod:`.find` (:func:`find_gates`), :mod:`.stats`. What the search
costs and how well it ranks positions on the toy models:
``docs/gate-finder-measurements.md``.

Example (toy-gated routes every visual fact through EOI):
    >>> from tl_vlm import HookedVLM
    >>> from tl_vlm.eval.tasks import toy_task
    >>> model = HookedVLM.from_pretrained("toy-gated")
    >>> gates = find_gates(model, toy_task(24), batch_size=12, overlap=False)
    >>> gates.verdict, gates.gate
    ('narrow', ['eoi'])
    >>> gates.ranking[0].name, gates.ranking[0].kind           # the best single candidate
    ('eoi', 'position')
    >>> print(gates.summary().splitlines()[0])
    narrow: eoi carries 0.98 of the image effect (from layer 1 on)
"""

from tl_vlm.analyses.gates.candidates import (IMAGE_SIDE, Key, candidate_classes,
                                              contribution_groups, position_roles, role_label)
from tl_vlm.analyses.gates.config import GateSearchConfig, Queries
from tl_vlm.analyses.gates.find import find_gates
from tl_vlm.analyses.gates.metric import GateMetric
from tl_vlm.analyses.gates.records import GateCheck, GateCost, LayerSweep
from tl_vlm.analyses.gates.result import GateCandidate, GateSearch
from tl_vlm.analyses.gates.search import first_call_only, no_weight_grads

__all__ = [
    "find_gates", "GateSearchConfig", "GateSearch", "GateCandidate", "GateCheck", "GateCost",
    "LayerSweep",
    "GateMetric", "candidate_classes", "position_roles", "role_label", "Key", "Queries",
    "IMAGE_SIDE",
]
