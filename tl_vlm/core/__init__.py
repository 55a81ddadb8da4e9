"""The core: HookedVLM, loading, registration with TransformerLens, the attention
function and its edits, and the inputs (batch, positions, layout).

Nothing here imports the layers above (adapters, analyses, eval, study, cli); the
families are found by name in :mod:`tl_vlm.adapters` (:mod:`tl_vlm.core.family`).
Importing this package imports nothing heavy.
"""
