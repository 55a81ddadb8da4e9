"""Check a real checkpoint on real hardware before trusting an analysis on it.

``tl-vlm verify-checkpoint MODEL`` (``scripts/verify-checkpoint``) is what to run first on
a GPU machine with hub access. It loads the checkpoint twice, as tl_vlm's
:class:`~tl_vlm.core.model.HookedVLM` and as the plain Hugging Face model with
``attn_implementation="sdpa"``, on a prompt with a synthetic image, and checks:

- **parity**: next-token log-probabilities of the two agree (max difference, and whether
  the greedy token is the same at every text position);
- **positions**: the image tokens tl_vlm locates are the ones the processor marks
  (``mm_token_type_ids``, or ``token_type_ids``) in its output;
- **hooks**: every ``run_with_cache`` hook fires, and an edit to ``hook_pattern`` in the
  first and last layer changes the logits (the hooks are live);
- **knockouts**: cutting attention to the whole image changes the next-token distribution
  (the image reaches the prediction); the effect of cutting the gate is reported (KL).

It prints the checks and appends one row to ``docs/verified-models.md`` (or ``--record``).

Example (a shipped toy model on CPU; a real run passes a hub id and a GPU):
    >>> import tempfile, pathlib
    >>> record = pathlib.Path(tempfile.mkdtemp()) / "verified.md"
    >>> report = verify_checkpoint("toy-gated", dtype="float32", record=record)
    >>> report.passed, report.checks["hooks live"]
    (True, True)
    >>> record.read_text().count("| toy-gated |")
    1
"""

from __future__ import annotations

import datetime
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch

from tl_vlm.core.devices import dtype_name, resolve_dtype

RECORD = Path("docs/verified-models.md")
_HEADER = ("| date | model | family | dtype | device | max \\|Δ log p\\| | greedy agree | "
           "positions | hooks live | gate knockout KL | tl_vlm | torch | transformers | "
           "transformer-lens |\n|" + "---|" * 14 + "\n")
# What counts as "the same model" in each dtype: the largest log-prob difference allowed.
_LOGPROB_TOLERANCE = {torch.float32: 1e-3, torch.float16: 0.1, torch.bfloat16: 0.25}


@dataclass
class VerificationReport:
    """What :func:`verify_checkpoint` found; ``checks`` maps a check to pass/fail.

    Example:
        >>> report = VerificationReport("m", "llava", "bfloat16", "cuda:0",
        ...                             checks={"hooks live": True}, numbers={"KL": "0.3"})
        >>> report.passed, report.lines()
        (True, ['PASS  hooks live', '      KL: 0.3'])
    """

    model: str
    family: str
    dtype: str
    device: str
    checks: dict[str, bool] = field(default_factory=dict)
    numbers: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(self.checks.values())

    def lines(self) -> list[str]:
        """Human-readable lines, one per check, then the notes."""
        out = [f"{'PASS' if ok else 'FAIL'}  {name}" for name, ok in self.checks.items()]
        out += [f"      {k}: {v}" for k, v in self.numbers.items()]
        return out + [f"note: {n}" for n in self.notes]


def _probe_image(size: int = 512):
    """A synthetic picture with structure (no network needed): colour ramps and a disc."""
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:size, 0:size] / size
    disc = ((x - 0.6) ** 2 + (y - 0.4) ** 2 < 0.05)
    rgb = np.stack([x, y, np.where(disc, 1.0, 0.2)], -1)
    return Image.fromarray((rgb * 255).astype("uint8"))


def _positions_check(model, prompts: list[str], images: list[Any], positions
                     ) -> tuple[Optional[bool], str]:
    """The located image tokens against the positions the processor marks as image tokens."""
    layout = model.layout
    texts = [layout.with_placeholders(p, 1) for p in prompts]
    inputs = dict(model.processor(text=texts, images=layout.processor_images([[im] for im in images]),
                                  return_tensors="pt", padding=True, padding_side="left",
                                  return_mm_token_type_ids=True))
    marks = inputs.get("mm_token_type_ids", inputs.get("token_type_ids"))
    located = torch.zeros_like(positions.padding.mask)
    for name in layout.processor_counted:
        located |= getattr(positions, name).mask
    if marks is not None and bool(torch.as_tensor(marks).bool().any()):
        same = torch.equal(torch.as_tensor(marks).bool().cpu(), located)
        return same, f"{int(located.sum())} image tokens, compared with mm_token_type_ids"
    return None, "the processor marks no image tokens: positions not cross-checked"


@torch.no_grad()
def verify_checkpoint(
    name_or_path: str,
    dtype: Union[str, torch.dtype] = "bfloat16",
    device: Optional[str] = None,
    prompt: str = "What is shown in this picture?",
    record: Union[str, Path, None] = RECORD,
    **load_kwargs: Any,
) -> VerificationReport:
    """Load ``name_or_path`` with tl_vlm and plainly with Hugging Face; run the checks of
    the module docstring; append a row to ``record`` (None: do not record).

    ``load_kwargs`` go to :meth:`HookedVLM.from_pretrained` (``device_map``, ``n_devices``,
    ``max_memory``, ``processor``...).

    Example:
        >>> report = verify_checkpoint("toy-distributed", dtype="float32", record=None)
        >>> sorted(report.checks)[:2], report.passed
        (['every hook fires', 'hooks live'], True)
        >>> verify_checkpoint("facebook/chameleon-7b", device="cuda")        # doctest: +SKIP
    """
    import transformers

    from tl_vlm import analyses as A
    from tl_vlm.core.loading import resolve_model_name
    from tl_vlm.core.model import HookedVLM

    dtype = resolve_dtype(dtype)
    model = HookedVLM.from_pretrained(name_or_path, dtype=dtype, device=device, **load_kwargs)
    report = VerificationReport(str(name_or_path), model.family.name, dtype_name(dtype),
                                str(model.cfg.device))
    image = _probe_image()
    prompts = [prompt, "Describe the image."]
    batch = model.prepare(prompts, images=[image, image], padding_side="left")

    # parity with plain Hugging Face (sdpa), same inputs
    path = resolve_model_name(str(name_or_path))
    reference = getattr(transformers, type(model.hf_model).__name__).from_pretrained(
        path, dtype=dtype, attn_implementation="sdpa",
        **({"device_map": load_kwargs["device_map"]} if "device_map" in load_kwargs else {}))
    if "device_map" not in load_kwargs:
        reference.to(model.cfg.device)
    reference.eval()
    text = (batch.positions.text.mask & ~batch.positions.padding.mask).to(model.cfg.device)
    ours = model(batch).float().log_softmax(-1)[text]
    theirs = reference(**batch.inputs).logits.float().log_softmax(-1)[text.to(ours.device)]
    del reference
    diff = float((ours - theirs.to(ours.device)).abs().max())
    agree = float((ours.argmax(-1) == theirs.to(ours.device).argmax(-1)).float().mean())
    report.numbers.update({"max |Δ log p| vs HF sdpa": f"{diff:.3g}",
                           "greedy tokens agreeing": f"{agree:.3f}"})
    report.checks["parity with Hugging Face"] = diff <= _LOGPROB_TOLERANCE.get(dtype, 0.25) \
        and agree >= 0.99

    ok, how = _positions_check(model, prompts, [image, image], batch.positions)
    report.numbers["positions"] = how
    if ok is None:
        report.notes.append(how)
    else:
        report.checks["positions agree with the processor"] = ok

    # hooks: every cached name fires, pattern edits are live in the first and last layer
    logits, cache = model.run_with_cache(batch)
    report.checks["every hook fires"] = len(cache) > 0 and all(v is not None for v in cache.values())
    live = []
    for layer in (0, model.cfg.n_layers - 1):
        edit = [(f"blocks.{layer}.attn.hook_pattern", lambda p, hook: p * 0.5)]
        live.append(float((model.run_with_hooks(batch, fwd_hooks=edit) - logits).abs().max()))
    del cache
    report.numbers["hook_pattern edit moves logits by"] = [f"{v:.3g}" for v in live]
    report.checks["hooks live"] = all(v > 0 for v in live)

    # knockouts: cutting the whole image must matter (a sanity check); the gate's effect
    # is a measurement (a non-native model may not route through its EOI at all)
    pos = batch.positions
    last = pos.last.mask.to(logits.device)
    clean = logits[last].float().log_softmax(-1)

    def kl_after_cutting(keys) -> float:
        cut = model.run_with_hooks(batch, fwd_hooks=A.knockout_hooks(model, batch, keys=keys))
        q = cut[last].float().log_softmax(-1)
        return float((clean.exp() * (clean - q)).sum(-1).mean())

    image_kl = kl_after_cutting(pos.image_side)
    report.numbers["KL(clean || image knocked out)"] = f"{image_kl:.3g}"
    report.checks["the image reaches the prediction"] = image_kl > 1e-6
    kl = kl_after_cutting(pos.gate) if not pos.gate.is_empty() else float("nan")
    report.numbers["KL(clean || gate knocked out)"] = f"{kl:.3g}"
    if record is not None:
        _append_row(Path(record), report, diff, agree, ok, live, kl)
    return report


def _append_row(path: Path, report: VerificationReport, diff: float, agree: float,
                positions: Optional[bool], live: list[float], kl: float) -> None:
    import transformer_lens
    import transformers

    from tl_vlm.core.version import __version__

    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("# Checkpoints verified with `tl-vlm verify-checkpoint`\n\n"
                        "One row per run (appended by the command).\n\n" + _HEADER)
    elif not path.read_text().endswith("\n"):
        path.write_text(path.read_text() + "\n")
    pos = "n/a" if positions is None else ("ok" if positions else "MISMATCH")
    row = [datetime.date.today().isoformat(), report.model, report.family, report.dtype,
           f"{report.device} ({platform.machine()})", f"{diff:.3g}", f"{agree:.3f}", pos,
           "yes" if all(v > 0 for v in live) else "NO", f"{kl:.3g}", __version__,
           torch.__version__, transformers.__version__,
           getattr(transformer_lens, "__version__", "?")]
    with path.open("a") as f:
        f.write("| " + " | ".join(row) + " |\n")


def main(argv: Optional[list[str]] = None) -> int:
    """``tl-vlm verify-checkpoint`` / ``python -m tl_vlm.study.verify``; returns the exit status.

    Example:
        >>> main(["toy-gated", "--dtype", "float32", "--record", ""])   # doctest: +ELLIPSIS
        PASS  parity with Hugging Face
        ...
        0
    """
    import argparse

    parser = argparse.ArgumentParser(
        prog="tl-vlm verify-checkpoint",
        description="Check a checkpoint against Hugging Face: parity, image positions, live "
                    "hooks, a gate knockout. Appends a row to docs/verified-models.md.",
        epilog="example: tl-vlm verify-checkpoint facebook/chameleon-7b --dtype bfloat16 "
               "--device cuda")
    parser.add_argument("model", help="hub id, local checkpoint directory or toy model name")
    parser.add_argument("--dtype", default="bfloat16", help="bfloat16 | float16 | float32")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cpu)")
    parser.add_argument("--n-devices", type=int, default=None, help="split over this many GPUs")
    parser.add_argument("--record", default=str(RECORD),
                        help="markdown file to append the result row to ('' to skip)")
    args = parser.parse_args(argv)
    extra = {"n_devices": args.n_devices} if args.n_devices else {}
    report = verify_checkpoint(args.model, dtype=args.dtype, device=args.device,
                               record=args.record or None, **extra)
    print("\n".join(report.lines()))
    return 0 if report.passed else 1


if __name__ == "__main__":
    raise SystemExit(main())
