"""Train the toy native VLMs (``gated``, ``distributed``, ``last_image``) from a seed.

All are standard ``ChameleonForConditionalGeneration`` checkpoints (4 layers, hidden
64, 4 heads) trained with AdamW on the toy task (:mod:`tl_vlm.toy.task`), with a loss
on the answer token (and on ``</s>`` after it). What differs is which attention edges
training forbids:

- ``gated``: text after the image may not attend to BOI or the image codes, only to
  EOI (and to BOS and text), so every bit of visual information passes the gate.
- ``distributed``: text after the image may not attend to EOI, and EOI may not attend
  to BOI or the image codes, so the information travels from the codes themselves.
- ``last_image``: text after the image may attend to the *last* image code only (not to
  BOI, the other codes or EOI), and EOI may not attend to BOI or the codes (so a stray
  glance at EOI finds nothing), so the gate sits on the last image token instead of EOI
  (a gate that is not EOI, for :func:`tl_vlm.analyses.find_gates` to find). A causal
  model can only gather the image at a position after the codes it reads, so the last
  code is the earliest image-side position that can be a single gate.

Forbidden edges get ``-inf`` before the softmax during training. The finished models are
evaluated (and shipped) *without* any mask, so training also penalises the attention
the unmasked model would put on the forbidden edges: at every layer and head the
softmax is computed both with and without the mask; the masked one drives the forward
pass and the mass the unmasked one gives the forbidden keys (mean over constrained
query rows, heads and layers) is added to the loss with weight ``penalty``. Once that
mass is ~0, the unmasked model computes what the masked one does.

More terms make the mechanism clean and quick to learn:

- robustness (every model): half of every batch runs a second time under the paper's
  knockout that should blind the model (``gated``: every position cut from EOI;
  ``last_image``: from the last code; ``distributed``: text cut from BOI and the
  codes; post-softmax zeroing as in
  :mod:`tl_vlm.analyses.knockout`), and the forbidden mass of *that* pass is penalised
  too. Without it, the gated model's text, thrown off its training distribution by an
  EOI knockout, attended to the image again and answered above chance.
- probe (``gated`` and ``last_image``): linear read-outs of colour, shape and position
  from the gate's residual stream (EOI, or the last code; after layer 2 and after
  layer 4) add their cross-entropy to the loss.
  The two-hop route (EOI reads the image, the text reads EOI) otherwise sits on a
  plateau for hundreds of steps, on some seeds for the whole run. The read-outs are
  discarded; the checkpoint is a plain Chameleon.
- blind (``last_image`` only): half of every batch runs twice more as the model is
  shipped, without masks: intact, with the answer's cross-entropy, and under the
  knockout of its gate, with the cross-entropy of its closed-set answer to a uniform
  guess. Without it the text of this model, blind to the last code, still read the
  shape off the trace of attention the penalty leaves on the other codes (0.63 on shape
  questions); with the knocked-out pass alone it learnt to spoil its unmasked answers
  through that trace instead.

One schedule (``last_image`` only): the penalty is off for the first ``penalty_delay``
steps and ramps up over ``penalty_ramp``. The last code is an image code like the others,
so a penalty from step 0 teaches the text to ignore every code before it has learnt to
read the last one (the run sits at chance); once the masked model reads it, the penalty
makes it find the last code without the mask (by its position next to the question).

Run ``python -m tl_vlm.toy.train --out DIR --seed 0`` to write ``DIR/gated``,
``DIR/distributed`` and ``DIR/last_image`` (``--out tl_vlm/toy/models`` regenerates the
shipped ones; ``--models last_image`` only that one), and
``python -m tl_vlm.toy.train --check`` to retrain them in a temporary directory and
compare their accuracies with the shipped models' ``metrics.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from tl_vlm.toy import task
from tl_vlm.toy.task import BOI, EOI, SEP, ToyExample, token_id

ATTN_IMPLEMENTATION = "tl_vlm_toy_train"
EVAL_SIZE = 600          # examples in the evaluation written to metrics.json
SHIPPED_SEED = 0


@dataclass
class Recipe:
    """Architecture and optimisation of one toy model."""

    name: str
    layers: int = 4
    hidden: int = 64
    heads: int = 4
    intermediate: int = 128
    steps: int = 800
    batch: int = 64
    lr: float = 3e-3
    warmup: int = 100
    weight_decay: float = 0.01
    penalty: float = 10.0
    penalty_delay: int = 0
    penalty_ramp: int = 0
    probe: float = 0.0
    robust: bool = False
    blind: float = 0.0

    def penalty_at(self, step: int) -> float:
        """The penalty's weight at ``step``: zero for ``penalty_delay`` steps, then a
        linear ramp over ``penalty_ramp`` steps up to ``penalty``."""
        if step < self.penalty_delay:
            return 0.0
        return self.penalty * min(1.0, (step - self.penalty_delay + 1) / (self.penalty_ramp + 1))

    @property
    def probe_layers(self) -> tuple[int, ...]:
        """Residual streams (``hidden_states`` indices) the probe reads at EOI."""
        return (self.layers // 2, self.layers)

    def forbidden(self, ids: torch.Tensor) -> torch.Tensor:
        """``[batch, q, k]``: the attention edges training forbids (see module doc)."""
        boi, image, eoi, after = _sets(ids)
        if self.name == "gated":
            return after[:, :, None] & (boi | image)[:, None, :]
        if self.name == "distributed":
            return ((after[:, :, None] & eoi[:, None, :])
                    | (eoi[:, :, None] & (boi | image)[:, None, :]))
        if self.name == "last_image":
            last = _last_code(image)
            return ((after[:, :, None] & (boi | (image & ~last) | eoi)[:, None, :])
                    | (eoi[:, :, None] & (boi | image)[:, None, :]))
        raise ValueError(f"unknown toy model {self.name!r}; choose from {sorted(RECIPES)}")

    def gate(self, ids: torch.Tensor) -> torch.Tensor:
        """``[batch, pos]``: the planted gate, where the probe reads and the robustness
        knockout cuts: the last code for ``last_image``, else EOI (unused by
        ``distributed``, which has no probe and another knockout)."""
        boi, image, eoi, after = _sets(ids)
        return _last_code(image) if self.name == "last_image" else eoi

    def knockout(self, ids: torch.Tensor) -> torch.Tensor:
        """``[batch, q, k]``: the paper's knockout that must blind this model (the gate
        for ``gated`` and ``last_image``, image -> text for ``distributed``), zeroed in
        the robustness pass."""
        boi, image, eoi, after = _sets(ids)
        if self.name == "distributed":
            return after[:, :, None] & (boi | image)[:, None, :]
        return self.gate(ids)[:, None, :].expand(-1, ids.shape[1], -1)


def _sets(ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``[batch, pos]`` masks of BOI, image codes, EOI and the (non-pad) text after EOI."""
    boi, eoi = ids == token_id(BOI), ids == token_id(EOI)
    first, last = token_id(task.code_token(0)), token_id(task.code_token(task.N_CODES - 1))
    image = (ids >= first) & (ids <= last)
    after = (torch.cumsum(eoi.long(), dim=1) > 0) & ~eoi & (ids != token_id("<pad>"))
    return boi, image, eoi, after


def _last_code(image: torch.Tensor) -> torch.Tensor:
    """``[batch, pos]``: the last image code of each row (the code before the first
    position that is not a code)."""
    after_code = torch.zeros_like(image)
    after_code[:, :-1] = ~image[:, 1:]
    return image & after_code


RECIPES = {"gated": Recipe("gated", probe=1.0, robust=True),
           "distributed": Recipe("distributed", robust=True),
           "last_image": Recipe("last_image", probe=1.0, robust=True, blind=1.0,
                                penalty_delay=200, penalty_ramp=200)}


# -- tokenizer, processor, config ----------------------------------------------------


def build_tokenizer():
    """Word-level fast tokenizer over :func:`tl_vlm.toy.task.vocabulary`; adds BOS."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(task.vocabulary())}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                  pad_token="<pad>", unk_token="<unk>", sep_token=SEP)
    tok.add_special_tokens({"additional_special_tokens": ["<image>", BOI, EOI, SEP]})
    assert tok.get_vocab() == vocab, "special tokens must not renumber the vocabulary"
    return tok


def build_processor(tokenizer):
    """A ``ChameleonProcessor``; its (unused) pixel path gives a 6x6 grid like the task."""
    from transformers import ChameleonImageProcessorPil, ChameleonProcessor

    side = 24   # two VQ downsamplings: 24 -> 12 -> 6
    return ChameleonProcessor(
        image_processor=ChameleonImageProcessorPil(
            size={"shortest_edge": side}, crop_size={"height": side, "width": side}),
        tokenizer=tokenizer, image_seq_length=task.GRID * task.GRID)


def build_config(recipe: Recipe, tokenizer):
    from transformers import ChameleonConfig

    return ChameleonConfig(
        vocab_size=len(tokenizer), hidden_size=recipe.hidden,
        intermediate_size=recipe.intermediate, num_hidden_layers=recipe.layers,
        num_attention_heads=recipe.heads, num_key_value_heads=recipe.heads,
        max_position_embeddings=128, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        vocabulary_map=tokenizer.get_vocab(), tie_word_embeddings=False,
        # A valid, tiny VQ tokenizer (24px -> 6x6 codes of a 16-code book). It is never
        # trained: the toy images are written as code tokens.
        vq_config=dict(embed_dim=4, num_embeddings=task.N_CODES, latent_channels=4,
                       resolution=24, base_channels=32, channel_multiplier=[1, 1, 1],
                       num_res_blocks=1, attn_resolutions=None),
    )


# -- training attention: masked forward, penalty on the unmasked pattern ------------


class _State:
    forbid: Optional[torch.Tensor] = None      # [batch, q, k] edges masked (-inf)
    zero: Optional[torch.Tensor] = None        # [batch, q, k] edges zeroed after softmax
    leak: list = []                            # per layer: [batch, head, q] forbidden mass


def _training_attention(module, query, key, value, attention_mask, dropout=0.0,
                        scaling=None, **kwargs):
    """Eager attention; with ``_State.forbid`` set, masks those edges and records the
    mass the unmasked softmax would give them."""
    n_rep = getattr(module, "num_key_value_groups", 1)
    if n_rep > 1:
        key = key.repeat_interleave(n_rep, dim=1)
        value = value.repeat_interleave(n_rep, dim=1)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask[:, :, :, : key.shape[-2]]
    forbid = _State.forbid
    if forbid is not None:
        cut = forbid[:, None, -scores.shape[2]:, : scores.shape[3]]
        free = torch.softmax(scores, dim=-1, dtype=torch.float32)
        _State.leak.append((free * cut).sum(-1))
        scores = scores.masked_fill(cut, torch.finfo(scores.dtype).min)
    pattern = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    if _State.zero is not None:   # the paper's knockout: zero, no renormalisation
        pattern = pattern.masked_fill(_State.zero[:, None, -scores.shape[2]:, : scores.shape[3]], 0.0)
    out = torch.matmul(pattern, value).transpose(1, 2).contiguous()
    return out, pattern


def _register_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(ATTN_IMPLEMENTATION, _training_attention)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, eager_mask)


# -- data ------------------------------------------------------------------------------


def encode(examples: list[ToyExample], with_answer: bool = True):
    """Token ids as the shipped processor makes them (``<s>`` prompt ``<reserved08706>``),
    plus the answer and ``</s>`` when ``with_answer``; right padded.

    Returns ``(ids, attention_mask, sep_index)``.
    """
    rows = []
    for e in examples:
        row = [token_id("<s>")] + [token_id(w) for w in e.prompt.split()] + [token_id(SEP)]
        if with_answer:
            row += [e.answer_id, token_id("</s>")]
        rows.append(row)
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), token_id("<pad>"), dtype=torch.long)
    mask = torch.zeros_like(ids)
    sep = torch.empty(len(rows), dtype=torch.long)
    for b, row in enumerate(rows):
        ids[b, : len(row)] = torch.tensor(row)
        mask[b, : len(row)] = 1
        sep[b] = len(row) - (3 if with_answer else 1)
    return ids, mask, sep


class Probe(torch.nn.Module):
    """Linear read-outs of the image's three attributes from the gate's residual stream
    at some layers (an auxiliary training loss for the gated models; not shipped)."""

    def __init__(self, hidden: int, layers: tuple[int, ...]) -> None:
        super().__init__()
        self.layers = layers
        self.heads = torch.nn.ModuleList(torch.nn.Linear(hidden, 12) for _ in layers)

    def loss(self, hidden_states, gate: torch.Tensor, examples: list[ToyExample]) -> torch.Tensor:
        """``gate``: ``[batch, pos]`` marking the one position the probe reads per row."""
        at = gate.float().argmax(-1)
        rows = torch.arange(len(gate))
        labels = torch.tensor([[e.image.colour, e.image.shape, e.image.position] for e in examples])
        losses = []
        for layer, head in zip(self.layers, self.heads):
            logits = head(hidden_states[layer][rows, at]).view(-1, 3, 4)
            losses.append(torch.nn.functional.cross_entropy(logits.reshape(-1, 4), labels.reshape(-1)))
        return torch.stack(losses).mean()


def _forward(model, ids, mask, forbid, zero=None, hidden_states=False):
    """The decoder with ``forbid`` masked (and ``zero`` zeroed); (output, leak per layer)."""
    _State.forbid, _State.zero, _State.leak = forbid, zero, []
    try:
        out = model.model(input_ids=ids, attention_mask=mask, output_hidden_states=hidden_states)
        return out, _State.leak
    finally:
        _State.forbid, _State.zero, _State.leak = None, None, []


def _mean_leak(leak_rows: list, forbid: torch.Tensor) -> torch.Tensor:
    """Forbidden attention mass, mean over layers, heads and constrained query rows."""
    rows_with_cut = forbid.any(-1)                                   # [batch, q]
    per_layer = [(m.mean(1) * rows_with_cut).sum() / rows_with_cut.sum() for m in leak_rows]
    return torch.stack(per_layer).mean()


def _loss(model, recipe: Recipe, examples: list[ToyExample], probe: Optional[Probe] = None):
    """(answer + ``</s>`` cross-entropy [+ probe loss], forbidden attention mass)."""
    ids, mask, sep = encode(examples)
    forbid = recipe.forbidden(ids)
    out, leak_rows = _forward(model, ids, mask, forbid, hidden_states=probe is not None)
    leak = _mean_leak(leak_rows, forbid)
    if recipe.robust:
        # Half the batch again under the knockout that should leave the text blind
        # (see Recipe.knockout): the text, now off its training distribution, must still
        # not attend along the forbidden edges.
        half = slice(0, len(ids) // 2)
        _, knocked = _forward(model, ids[half], mask[half], forbid[half],
                              recipe.knockout(ids[half]))
        leak = (leak + _mean_leak(knocked, forbid[half])) / 2
    logits = model.lm_head(out.last_hidden_state)
    rows = torch.arange(len(ids))
    targets = torch.stack([ids[rows, sep + 1], ids[rows, sep + 2]], dim=1)
    picked = torch.stack([logits[rows, sep], logits[rows, sep + 1]], dim=1)
    ce = torch.nn.functional.cross_entropy(picked.reshape(-1, picked.shape[-1]), targets.reshape(-1))
    if probe is not None:
        ce = ce + recipe.probe * probe.loss(out.hidden_states, recipe.gate(ids), examples)
    if recipe.blind:
        ce = ce + recipe.blind * _blind_loss(model, recipe, examples, ids, mask, sep)
    return ce, leak


def _blind_loss(model, recipe: Recipe, examples, ids, mask, sep) -> torch.Tensor:
    """On half the batch, run as the model is shipped (no masks): the answer's
    cross-entropy with the gate open, plus how far the closed-set answer with the gate
    knocked out is from a uniform guess (cross-entropy to uniform minus log 4; zero when
    blind). The masked passes cannot see what reaches the text through the tiny attention
    the penalty leaves on forbidden edges; these passes can, and the pair leaves the
    model no unmasked shortcut that works only when the gate is cut (nor one that spoils
    the clean answer)."""
    half = slice(0, len(ids) // 2)
    cands = torch.tensor([[token_id(a) for a in task.ANSWERS[e.question]] for e in examples[half]])
    rows = torch.arange(len(cands))
    losses = []
    for zero in (None, recipe.knockout(ids[half])):
        out, _ = _forward(model, ids[half], mask[half], None, zero)
        log_p = torch.log_softmax(model.lm_head(out.last_hidden_state[rows, sep[half]]), dim=-1)
        if zero is None:
            losses.append(-log_p[rows, ids[half][rows, sep[half] + 1]].mean())
        else:
            closed = torch.log_softmax(log_p.gather(1, cands), dim=-1)
            losses.append(-closed.mean() - math.log(cands.shape[1]))
    return sum(losses)


@torch.no_grad()
def quick_accuracy(model, examples: list[ToyExample]) -> tuple[float, dict[str, float]]:
    """Closed-set accuracy (overall, per question) of the plain (unmasked) HF model."""
    ids, mask, sep = encode(examples, with_answer=False)
    logits = model(input_ids=ids, attention_mask=mask).logits[torch.arange(len(ids)), sep]
    cands = torch.tensor([[token_id(a) for a in task.ANSWERS[e.question]] for e in examples])
    labels = torch.tensor([e.label for e in examples])
    right = (logits.gather(1, cands).argmax(-1) == labels).float()
    per_q = {q: float(right[[i for i, e in enumerate(examples) if e.question == q]].mean())
             for q in task.QUESTION_TYPES}
    return float(right.mean()), per_q


def train(recipe: Recipe, seed: int = SHIPPED_SEED, log=print):
    """Train one toy model; returns the HF model (eval mode) and training stats."""
    from transformers import ChameleonForConditionalGeneration

    _register_attention()
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    config = build_config(recipe, tokenizer)
    model = ChameleonForConditionalGeneration(config)
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    model.train()
    probe = Probe(recipe.hidden, recipe.probe_layers) if recipe.probe else None
    params = [(n, p) for n, p in model.named_parameters() if "vqmodel" not in n]
    params += list(probe.named_parameters()) if probe is not None else []
    decay = [p for n, p in params if p.ndim >= 2]
    other = [p for n, p in params if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": recipe.weight_decay},
                             {"params": other, "weight_decay": 0.0}],
                            lr=recipe.lr, betas=(0.9, 0.98))

    def lr_at(step: int) -> float:
        if step < recipe.warmup:
            return (step + 1) / recipe.warmup
        t = (step - recipe.warmup) / max(1, recipe.steps - recipe.warmup)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    rng = np.random.default_rng([task.TRAIN_STREAM, seed])
    monitor = list(task.make_examples(150, seed=seed, stream=task.TRAIN_STREAM + 100))
    start = time.time()
    for step in range(recipe.steps):
        examples = task.batch_examples(rng, recipe.batch)
        ce, leak = _loss(model, recipe, examples, probe)
        loss = ce + recipe.penalty_at(step) * leak
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for _, p in params], 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == recipe.steps - 1:
            model.eval()
            acc, per_q = quick_accuracy(model, monitor)
            model.train()
            shown = " ".join(f"{q[:3]} {a:.2f}" for q, a in per_q.items())
            log(f"[{recipe.name}] step {step:5d}  ce {ce.item():.4f}  leak {leak.item():.5f}  "
                f"unmasked acc {acc:.3f} ({shown})  ({time.time() - start:.0f}s)")
    model.eval()
    model.set_attn_implementation("eager")
    return model, tokenizer, {"train_seconds": round(time.time() - start, 1)}


# -- saving, evaluating, model card ---------------------------------------------------


def save(model, tokenizer, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    build_processor(tokenizer).save_pretrained(out)


def evaluate_saved(path: Path, n: int = EVAL_SIZE) -> dict[str, Any]:
    """Load ``path`` with :class:`tl_vlm.HookedVLM` and score every condition."""
    from tl_vlm.core.model import HookedVLM
    from tl_vlm.toy.evaluate import evaluate_all

    model = HookedVLM.from_pretrained(str(path))
    data = task.make_examples(n, seed=task.DEFAULT_EVAL_SEED)
    return {c: s.as_dict() for c, s in evaluate_all(model, data).items()}


def write_card(path: Path, recipe: Recipe, seed: int, metrics: dict, stats: dict) -> None:
    from tl_vlm.toy import MODEL_CARD

    rows = "\n".join(
        f"| {c} | {m['accuracy']:.3f} | {m['strict']:.3f} | "
        f"{m['per_question']['colour']:.3f} | {m['per_question']['shape']:.3f} | "
        f"{m['per_question']['position']:.3f} |" for c, m in metrics.items())
    text = MODEL_CARD.format(
        name=model_name(recipe.name), kind=recipe.name, seed=seed, recipe=json.dumps(asdict(recipe)),
        rows=rows, n=EVAL_SIZE, eval_seed=task.DEFAULT_EVAL_SEED,
        seconds=stats.get("train_seconds", "?"),
        rule=_RULES[recipe.name],
        probe=(f" An auxiliary linear probe (not shipped) read colour, shape and position "
               f"from {_GATES[recipe.name]}'s residual after layers 2 and 4 during training."
               if recipe.probe else "") + _schedule_note(recipe))
    (path / "README.md").write_text(text)


_RULES = {
    "gated": "text after the image may not attend to BOI or the image codes (only to EOI, "
             "BOS and text), so visual information must pass the gate (EOI)",
    "distributed": "text after the image may not attend to EOI, and EOI may not attend to "
                   "BOI or the image codes, so visual information must travel from the codes "
                   "themselves",
    "last_image": "text after the image may attend to the last image code only (not to BOI, "
                  "the other codes or EOI), and EOI may not attend to BOI or the codes, so "
                  "visual information must pass a gate planted on the last image token, not "
                  "on EOI",
}
_GATES = {"gated": "EOI", "last_image": "the last image code"}


def _schedule_note(recipe: Recipe) -> str:
    """The card's sentences on the ``last_image`` extras (empty for the other recipes)."""
    out = ""
    if recipe.penalty_delay or recipe.penalty_ramp:
        out += (f" The penalty was off for the first {recipe.penalty_delay} steps and ramped up "
                f"over the next {recipe.penalty_ramp} (a penalty from the start taught the text "
                f"to ignore every code, the last one too).")
    if recipe.blind:
        out += (" Half of each batch also ran without masks, intact (answer cross-entropy) "
                "and with the gate knocked out (cross-entropy to a uniform guess among the "
                "four answers), so that nothing reaches the text around the gate.")
    return out


def model_name(recipe: str) -> str:
    """The name a recipe's model loads by: ``"last_image"`` -> ``"toy-last-image"``."""
    return "toy-" + recipe.replace("_", "-")


def build(name: str, out: Path, seed: int = SHIPPED_SEED, log=print) -> dict[str, Any]:
    """Train, save (model, tokenizer, processor, card, metrics.json) and evaluate."""
    recipe = RECIPES[name]
    model, tokenizer, stats = train(recipe, seed, log)
    save(model, tokenizer, out)
    metrics = evaluate_saved(out)
    (out / "metrics.json").write_text(json.dumps(
        {"seed": seed, "recipe": asdict(recipe), **stats, "eval_examples": EVAL_SIZE,
         "eval_seed": task.DEFAULT_EVAL_SEED, "conditions": metrics}, indent=1) + "\n")
    write_card(out, recipe, seed, metrics, stats)
    return {"stats": stats, "conditions": metrics}


def rewrite_cards(out: Path, names=tuple(RECIPES)) -> None:
    """Rewrite the README.md of models under ``out`` from their metrics.json."""
    for name in names:
        metrics = json.loads((out / name / "metrics.json").read_text())
        recipe = Recipe(**metrics["recipe"])
        write_card(out / name, recipe, metrics["seed"], metrics["conditions"],
                   {"train_seconds": metrics["train_seconds"]})


def check(seed: int = SHIPPED_SEED, names=tuple(RECIPES), tolerance: float = 0.02,
          log=print) -> bool:
    """Retrain in a temporary directory and compare accuracies with the shipped models."""
    from tl_vlm.toy import toy_model_path

    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            shipped = json.loads((toy_model_path(model_name(name)) / "metrics.json").read_text())
            fresh = build(name, Path(tmp) / name, seed, log)
            for cond, m in shipped["conditions"].items():
                new = fresh["conditions"][cond]["accuracy"]
                diff = abs(new - m["accuracy"])
                good = diff <= tolerance
                ok &= good
                log(f"[check] {model_name(name):<15} {cond:>10}: shipped {m['accuracy']:.3f}  "
                    f"retrained {new:.3f}  |diff| {diff:.3f}  {'ok' if good else 'DIFFERENT'}")
    return ok


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, help="write DIR/<model> for each of --models")
    parser.add_argument("--seed", type=int, default=SHIPPED_SEED)
    parser.add_argument("--models", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--check", action="store_true",
                        help="retrain in a temporary directory and compare with the shipped models")
    parser.add_argument("--cards-only", action="store_true",
                        help="only rewrite DIR/*/README.md from DIR/*/metrics.json")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    if args.check:
        return 0 if check(args.seed, args.models) else 1
    if args.out is None:
        parser.error("--out DIR is required (or --check)")
    if args.cards_only:
        rewrite_cards(args.out, args.models)
        return 0
    for name in args.models:
        result = build(name, args.out / name, args.seed)
        from tl_vlm.toy.evaluate import ToyScore, format_scores

        scores = {c: ToyScore(m["accuracy"], m["strict"], m["per_question"], m["chance"], m["n"])
                  for c, m in result["conditions"].items()}
        print(format_scores(scores, f"{model_name(name)} ({result['stats']['train_seconds']}s)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
