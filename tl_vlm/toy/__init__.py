"""Three small trained native VLMs whose mechanism is known by construction.

``toy-gated``, ``toy-distributed`` and ``toy-last-image`` are
``ChameleonForConditionalGeneration`` checkpoints shipped in this package
(``models/gated``, ``models/distributed``, ``models/last_image``), trained on a
synthetic task (:mod:`tl_vlm.toy.task`: a 6x6 grid of VQ code tokens between
``<racm3:break>`` and ``<eoss>``, a question about the object's colour, shape or
position, a one-word answer). In ``toy-gated`` all visual information reaches the text
through EOI (the Narrow Gate); in ``toy-distributed`` the text reads the image tokens
directly and EOI carries nothing; in ``toy-last-image`` the gate is planted on the last
image code and EOI carries nothing either. :mod:`tl_vlm.toy.train` reproduces them from
a seed.

Example:
    >>> from tl_vlm import HookedVLM
    >>> from tl_vlm.toy import make_examples, evaluate
    >>> model = HookedVLM.from_pretrained("toy-gated")
    >>> data = make_examples(120, seed=1000)          # prompts, answers, labels
    >>> batch = model.prepare(data.prompts)            # no images: codes are tokens
    >>> evaluate(model, data).accuracy, round(evaluate(model, data, condition="eoi").accuracy, 2)
    (1.0, 0.28)
"""

from __future__ import annotations

from pathlib import Path

from tl_vlm.toy.task import (ANSWERS, QUESTION_TYPES, ToyDataset, ToyExample, ToyPair,
                             chance_level, make_examples, make_pairs)

# Imported eagerly: a lazy wrapper named like its submodule is replaced by the module
# object as soon as anything imports ``tl_vlm.toy.evaluate``.
from tl_vlm.toy.evaluate import evaluate  # noqa: E402

# Resolving a toy model's name is core's job (loading must not import this package).
from tl_vlm.core.names import TOY_MODELS, TOY_MODELS_DIR as MODELS_DIR, is_toy_model, toy_model_path  # noqa: E402


__all__ = ["ANSWERS", "QUESTION_TYPES", "ToyDataset", "ToyExample", "ToyPair", "chance_level",
           "evaluate", "is_toy_model", "make_examples", "make_pairs", "toy_model_path",
           "MODELS_DIR", "TOY_MODELS"]

MODEL_CARD = """\
---
library_name: transformers
tags: [chameleon, toy, interpretability, tl_vlm]
---
# {name}

A toy native vision-language model shipped with `tl_vlm` as ground truth for the
Narrow Gate analyses. It is a standard `ChameleonForConditionalGeneration` checkpoint
(load it with `tl_vlm.HookedVLM.from_pretrained(str(tl_vlm.toy.toy_model_path("{name}")))`
or with transformers directly).

## Task (`tl_vlm/toy/task.py`)
An image is a 6x6 grid of VQ codes (codebook of 24: 8 background textures, and 16
object pieces, one per shape and colour) written as tokens: `<racm3:break>`, 36 `IMGIMG...Z` code tokens row-major,
`<eoss>`. One 3x3 object (shape `square`/`plus`/`x`/`triangle`, colour
`red`/`green`/`blue`/`yellow`) sits in one quadrant (`top-left`/`top-right`/
`bottom-left`/`bottom-right`) over random background codes. A question follows
("what colour is the object ?", "which shape ?", "where is the object ?", ...);
the processor appends `<reserved08706>` and the model answers with one word, then `</s>`.
Each question type has 4 balanced answers: chance is 0.25.

## How it was made (`python -m tl_vlm.toy.train --out DIR --seed {seed}`)
Trained from scratch on CPU with AdamW on fresh random batches (training stream of seed
{seed}; evaluation sets use a different stream), loss on the answer token and on `</s>`.
Training rule ("{kind}"): {rule}. Those edges were masked (-inf before the softmax)
during training, and the attention the *unmasked* model would give them was penalised
(also on a second pass of half of each batch under the knockout that should blind the
model), so the shipped model runs with no mask at all.{probe} Training took {seconds} s on
one CPU thread; the training script is `tl_vlm/toy/train.py` (its docstring has the details).

Recipe: `{recipe}`

## Accuracy
{n} held-out examples (evaluation stream, seed {eval_seed}); knockouts in every layer, by
post-softmax zeroing without renormalisation as in the paper (`tl_vlm.analyses.knockout`).
`acc` is closed-set (argmax over the question type's 4 answers; chance 0.25), `strict` is
argmax over the whole vocabulary.

| condition | acc | strict | colour | shape | position |
|---|---|---|---|---|---|
{rows}

Conditions: `clean` none; `eoi` every position stops attending to `<eoss>`; `last_image`
every position stops attending to the last image code; `img2text` text after the image
stops attending to BOI and the codes; `random10` 10 random codes (mean of 3 draws).
"""
