"""tl_vlm at real width vs Hugging Face ``attn_implementation="sdpa"``, measured in one run.

Random-weight models at the released checkpoints' *width* (few layers), built with the
tiny builders of ``tests/tiny`` (saved with ``save_pretrained`` and a processor) and
loaded through ``HookedVLM.from_pretrained``:

- ``chameleon-7b``: Chameleon-7B width (hidden 4096, 32 heads, MLP 11008, vocabulary
  65536), 2 layers; a 128 px image -> 32 x 32 = 1024 VQ tokens, then 70 words: ~1.1k
  tokens (``--quick``: a 64 px image, 256 tokens, ~330 in all);
- ``qwen2-vl-7b``: Qwen2-VL-7B width (hidden 3584, 28 heads / 4 kv heads, MLP 18944,
  vocabulary 152064, M-RoPE sections [16, 24, 24]), 2 layers; a 480 px image -> 60 x 60
  = 3600 tokens (8 px per token in the tiny vision tower), then 520 words: ~4.1k tokens;
- ``sweep``: a narrower Chameleon with 16 layers (hidden 512, 8 heads, MLP 1376,
  vocabulary 65536; ``--quick``: hidden 256) for the layer sweep of gate patching.

What is measured (each tl_vlm operation against the Hugging Face forward that computes
the same logits; the model's HF twin shares the loaded weights in the timing process):

==================  ============================================================  ==========
operation           call                                                          baseline
==================  ============================================================  ==========
hf                  ``hf(**batch.inputs)`` (logits at every position)             --
hf_last             ``hf(**batch.inputs, logits_to_keep=batch.logits_to_keep)``   --
forward             ``model(batch)``                                              hf
forward_last        ``model.last_logits(batch)``                                  hf_last
knockout            ``model.last_logits(batch, fwd_hooks=gate_knockout(...))``    hf_last
contribution        ``cross_modal_contribution(model, batch)`` (value-weighted)   hf
contribution_last   the same hooks via ``run_with_hooks(..., logits_to_keep=)``   hf_last
cache               ``run_with_cache(batch, names_filter=<every resid_pre>)``     hf
cache_last          the same with ``logits_to_keep=batch.logits_to_keep``         hf_last
generate_knockout   ``model.generate(batch, N, fwd_hooks=gate_knockout(...))``    hf_generate
hf_gradient         HF sdpa, last logits, backward to the first decoder layer's   --
                    input (no weight gradients)
gate_gradient       ``find_gates``' gradient pass: a ``KeyScale`` on every layer, hf_gradient
                    backward to the scales (no weight gradients)
gate_gradient_full  the same with the contribution's readers riding along, as      hf_gradient
                    ``find_gates`` runs it
gate_gradient_      ``gate_gradient_full`` with ``recompute_blocks`` (activation   hf_gradient
recompute           checkpointing: ``find_gates(recompute_activations=True)``)
==================  ============================================================  ==========

``contribution`` computes logits at every position because ``cross_modal_contribution``
does (it reads none of them); ``contribution_last`` is the same accumulator with the
logits of one position, i.e. what the function would cost if it passed
``logits_to_keep``. ``hf_generate`` is ``hf.generate`` with the arguments
``HookedVLM.generate`` passes (greedy, ``DynamicCache``, ``output_logits``), both forced
to ``N`` new tokens.

Time: one process per (model, dtype, batch) holds both models; repetitions are
interleaved (round r runs every operation, in an order rotated by r) after a warm-up
on a short input; the table gives the ratio of minimum and of median wall-clock times.
Memory: every operation in a *fresh* subprocess that loads one model (HookedVLM, or HF
with ``attn_implementation="sdpa"`` for the baselines), runs one forward on a short input
(lazy initialisation), resets the kernel's peak-RSS counter (``/proc/self/clear_refs``),
runs the operation once and reports ``VmHWM - VmRSS before``: what the operation added at
its peak (weights excluded). Children run with ``MALLOC_MMAP_THRESHOLD_=65536`` so that
freed tensors go back to the kernel (see ``benchmarks/contribution_memory.py``).

Patching sweep: ``patch_gate(..., layers="all")`` with ``reuse_prefix=True`` vs ``False``
and, when nnsight is installed (``pip install tl-vlm[bench]``), the same naive sweep
written with nnsight on the plain HF model (one source trace, one clean trace, one
patched trace per layer; logits of the last position only, as tl_vlm's), interleaved;
the patched logits of the three are checked to agree.

On a shared machine wall-clock ratios swing by 2-5x between repetitions (other processes
take the cores); the CPU-time column is steadier, most of all with ``--threads 1`` (with
two threads, OpenMP spin-waits while descheduled count as CPU time).

Run: ``python benchmarks/real_scale.py [--quick] [--models chameleon-7b qwen2-vl-7b]
[--dtypes fp32 bf16] [--batches 1 4] [--timing-batches 1] [--reps 3] [--workdir DIR]``.
Results are appended to ``--results`` (JSON lines, default under the workdir) as they
come, and the table is written to ``benchmarks/results/real_scale.md`` (``--render``
re-renders it from a results file without measuring).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Optional

ROOT = Path(__file__).resolve().parents[1]
RESULTS_MD = ROOT / "benchmarks" / "results" / "real_scale.md"
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}

# Targets of issue 9, as (time, memory) ratios against the baseline.
TARGETS = {"forward": (1.05, 1.02), "forward_last": (1.05, 1.02), "knockout": (1.15, 1.10),
           "contribution": (1.15, 1.10), "contribution_last": (1.15, 1.10),
           "cache": (1.15, 1.10), "cache_last": (1.15, 1.10),
           "generate_knockout": (1.10, None), "gate_gradient": (1.15, 1.10),
           "gate_gradient_full": (1.15, 1.10),
           # activation checkpointing: one more forward's time, for memory
           "gate_gradient_recompute": (None, 1.0)}
BASELINE = {"forward": "hf", "forward_last": "hf_last", "knockout": "hf_last",
            "contribution": "hf", "contribution_last": "hf_last", "cache": "hf",
            "cache_last": "hf_last", "generate_knockout": "hf_generate",
            "gate_gradient": "hf_gradient", "gate_gradient_full": "hf_gradient",
            "gate_gradient_recompute": "hf_gradient"}


@dataclass(frozen=True)
class ModelSpec:
    """A random-weight model to build, and the input it is measured on."""

    name: str
    family: str              # tests/tiny module
    build_args: dict         # keywords of that module's build()
    image_px: int            # square image side, pixels
    words: int               # words of text after the image
    describe: str
    ops: tuple = ()          # operations measured (timing and memory)

    def key(self) -> str:
        digest = hashlib.sha1(json.dumps([self.family, self.build_args], sort_keys=True)
                              .encode()).hexdigest()[:8]
        return f"{self.name}-{digest}"


FULL_OPS = ("hf", "hf_last", "forward", "forward_last", "knockout", "contribution",
            "contribution_last", "cache", "cache_last", "hf_gradient", "gate_gradient",
            "gate_gradient_full", "gate_gradient_recompute")
# At 4k tokens and a 152k vocabulary, logits at every position cost more than the two
# decoder layers: measure those only where an API computes them anyway.
LONG_OPS = ("hf", "hf_last", "forward_last", "knockout", "contribution", "contribution_last",
            "cache_last", "hf_gradient", "gate_gradient", "gate_gradient_full",
            "gate_gradient_recompute")
CHAMELEON_7B = dict(layers=2, hidden=4096, heads=32, kv_heads=32, mlp=11008, vocab=65536)
QWEN2_VL_7B = dict(layers=2, hidden=3584, heads=28, kv_heads=4, mlp=18944, vocab=152064,
                   mrope_section=(16, 24, 24), max_positions=32768)


def model_specs(quick: bool) -> dict[str, ModelSpec]:
    cham_px = 64 if quick else 128
    qwen_px, qwen_words = (128, 70) if quick else (480, 520)
    sweep_hidden = 256 if quick else 512
    return {
        "chameleon-7b": ModelSpec(
            "chameleon-7b", "chameleon", dict(CHAMELEON_7B, image_size=cham_px), cham_px, 70,
            "Chameleon-7B width (hidden 4096, 32 heads, MLP 11008, vocab 65536), 2 layers",
            FULL_OPS),
        "qwen2-vl-7b": ModelSpec(
            "qwen2-vl-7b", "qwen2_vl",
            dict(QWEN2_VL_7B, max_pixels=480 * 480, randomise_weights=False), qwen_px,
            qwen_words, "Qwen2-VL-7B width (hidden 3584, 28 heads / 4 kv, MLP 18944, vocab "
            "152064, M-RoPE), 2 layers", LONG_OPS),
        "sweep": ModelSpec(
            "sweep", "chameleon",
            dict(layers=16, hidden=sweep_hidden, heads=8, kv_heads=8, mlp=sweep_hidden * 43 // 16,
                 vocab=65536, image_size=64), 64, 30,
            f"Chameleon layout, 16 layers, hidden {sweep_hidden}, 8 heads, vocab 65536"),
    }


# ---------------------------------------------------------------------------------------
# Inputs and models (run inside the children)
# ---------------------------------------------------------------------------------------
def _words(n: int) -> str:
    from tests.tiny import WORDS

    plain = [w for w in WORDS if w.isalpha()]
    return " ".join(plain[i % len(plain)] for i in range(n))


def make_batch(model, spec: ModelSpec, batch: int, seed: int = 0, short: bool = False):
    """``batch`` examples: one image each (different pictures), the same text after it.
    ``short``: a small input of the same kind, for warm-ups."""
    from tests.tiny import image

    px = spec.image_px if not short or spec.family == "chameleon" else 16
    words = 3 if short else spec.words
    n = 1 if short else batch
    return model.prepare([_words(words)] * n,
                         images=[image(seed + i, (px, px)) for i in range(n)])


def load_tl(path: str, dtype: str):
    from tl_vlm import HookedVLM

    return HookedVLM.from_pretrained(path, dtype=DTYPES[dtype])


def load_hf(path: str, dtype: str):
    import torch
    import transformers
    from transformers import AutoConfig

    cls = getattr(transformers, AutoConfig.from_pretrained(path).architectures[0])
    return cls.from_pretrained(path, attn_implementation="sdpa",
                               dtype=getattr(torch, DTYPES[dtype])).eval()


def hf_twin(model):
    """The plain HF model (``attn_implementation="sdpa"``) of ``model``'s checkpoint, built
    on the meta device and given ``model``'s own weight tensors: one copy of the weights
    for both (a 7B-width Qwen2-VL twice would not fit in 12 GB)."""
    import copy

    import torch

    hf_model = model.hf_model
    config = copy.deepcopy(hf_model.config)
    for sub in [config, *(getattr(config, k) for k in ("text_config", "vision_config",
                                                        "vq_config") if hasattr(config, k))]:
        sub._attn_implementation_internal = None
    with torch.device("meta"):
        twin = type(hf_model)._from_config(config, attn_implementation="sdpa",
                                           dtype=model.dtype)
    theirs = {}
    for name, tensor in [*hf_model.named_parameters(remove_duplicate=False),
                         *hf_model.named_buffers(remove_duplicate=False)]:
        theirs[name.replace("._original_component", "")] = tensor
    for name, _ in [*twin.named_parameters(remove_duplicate=False),
                    *twin.named_buffers(remove_duplicate=False)]:
        owner, _, leaf = name.rpartition(".")
        module = twin.get_submodule(owner)
        slot = module._parameters if leaf in module._parameters else module._buffers
        slot[leaf] = theirs[name]
    for module_name, module in twin.named_modules():   # plain tensor attributes (rotary)
        for attr, value in list(vars(module).items()):
            if isinstance(value, torch.Tensor) and value.is_meta:
                source = hf_model.get_submodule(module_name) if module_name else hf_model
                setattr(module, attr, getattr(_unwrap(source), attr))
    left = [n for n, t in [*twin.named_parameters(), *twin.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"HF twin: tensors left on the meta device: {left[:5]}")
    twin.generation_config = copy.deepcopy(hf_model.generation_config)
    return twin.eval()


def _unwrap(module):
    while hasattr(module, "_original_component"):
        module = module._original_component
    return module


def operations(spec: ModelSpec, model, hf, batch, new_tokens: int = 0) -> dict[str, Callable]:
    """name -> zero-argument callable; ``model`` or ``hf`` may be None (memory children)."""
    import torch
    from transformers import DynamicCache

    from tl_vlm.analyses.contribution import ContributionAccumulator, cross_modal_contribution
    from tl_vlm.analyses.knockout import gate_knockout

    keep = batch.logits_to_keep
    resid_pre = lambda name: name.endswith("hook_resid_pre")  # noqa: E731

    def contribution_last():
        acc = ContributionAccumulator(model)
        model.run_with_hooks(batch, fwd_hooks=acc.hooks(batch), output_attentions=False,
                             logits_to_keep=keep)
        return acc.result()

    def hf_generate():
        pad = hf.generation_config.pad_token_id
        pad = hf.config.get_text_config().pad_token_id if pad is None else pad
        return hf.generate(**batch.inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                           do_sample=False, pad_token_id=pad, return_dict_in_generate=True,
                           output_logits=True, past_key_values=DynamicCache())

    def gate_gradient(readers: bool = False, recompute: bool = False):
        """find_gates' gradient pass: a KeyScale on every layer, d(last logits)/d(scales);
        with ``readers``, the contribution's hooks ride along as in find_gates."""
        from tl_vlm.analyses.gates.candidates import contribution_groups
        from tl_vlm.analyses.gates.search import first_call_only, no_weight_grads
        from tl_vlm.core.attention_edits import KeyScale
        from tl_vlm.core.recompute import recompute_blocks

        pos = batch.positions
        scales = [torch.ones(pos.all.mask.shape, requires_grad=True)
                  for _ in range(model.cfg.n_layers)]
        hooks = []
        if readers:
            acc = ContributionAccumulator(model, groups=contribution_groups())
            hooks = [(name, first_call_only(fn)) for name, fn in acc.hooks(batch)]
        hooks += [(f"blocks.{l}.attn.hook_pattern", KeyScale(s, padding=pos.padding.mask))
                  for l, s in enumerate(scales)]
        with torch.enable_grad(), no_weight_grads(model), model.hooks(fwd_hooks=hooks), \
                recompute_blocks(model, enabled=recompute):
            last = model.last_logits(batch, use_cache=False)
            return torch.autograd.grad(last.float().logsumexp(-1).sum(), scales)

    def hf_gradient():
        """The same backward on HF sdpa: d(last logits)/d(first decoder layer's input)."""
        from tl_vlm.analyses.gates.search import no_weight_grads

        first = next(m for m in hf.modules() if type(m).__name__.endswith("DecoderLayer"))
        leaf = {}

        def as_leaf(module, args, kwargs):
            if args:
                leaf["x"] = args[0].detach().requires_grad_(True)
                return (leaf["x"], *args[1:]), kwargs
            leaf["x"] = kwargs["hidden_states"].detach().requires_grad_(True)
            return args, {**kwargs, "hidden_states": leaf["x"]}

        handle = first.register_forward_pre_hook(as_leaf, with_kwargs=True)
        try:
            with torch.enable_grad(), no_weight_grads(hf):
                logits = hf(**batch.inputs, logits_to_keep=keep).logits
                return torch.autograd.grad(logits.float().logsumexp(-1).sum(), leaf["x"])
        finally:
            handle.remove()

    ops = {
        "hf": lambda: hf(**batch.inputs),
        "hf_gradient": hf_gradient,
        "gate_gradient": gate_gradient,
        "gate_gradient_full": lambda: gate_gradient(readers=True),
        "gate_gradient_recompute": lambda: gate_gradient(readers=True, recompute=True),
        "hf_last": lambda: hf(**batch.inputs, logits_to_keep=keep),
        "forward": lambda: model(batch),
        "forward_last": lambda: model.last_logits(batch),
        "knockout": lambda: model.last_logits(batch, fwd_hooks=gate_knockout(model, batch)),
        "contribution": lambda: cross_modal_contribution(model, batch),
        "contribution_last": contribution_last,
        "cache": lambda: model.run_with_cache(batch, names_filter=resid_pre),
        "cache_last": lambda: model.run_with_cache(batch, names_filter=resid_pre,
                                                   logits_to_keep=keep),
        "hf_generate": hf_generate,
        "generate_knockout": lambda: model.generate(
            batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
            fwd_hooks=gate_knockout(model, batch)),
    }
    return ops


def _status_kb(field_name: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field_name} in /proc/self/status")


# ---------------------------------------------------------------------------------------
# Children
# ---------------------------------------------------------------------------------------
def child_build(spec: ModelSpec, path: str) -> dict:
    import importlib

    import torch

    torch.manual_seed(0)
    t0 = time.perf_counter()
    importlib.import_module(f"tests.tiny.{spec.family}").build(Path(path), **spec.build_args)
    (Path(path) / "BUILT").write_text(json.dumps(asdict(spec)))
    return {"built_s": time.perf_counter() - t0}


def child_time(spec: ModelSpec, path: str, dtype: str, batch_size: int, reps: int,
               ops: list[str], new_tokens: int) -> dict:
    import torch

    from tl_vlm.core.attention import record_paths

    model = load_tl(path, dtype)
    hf = hf_twin(model)
    batch = make_batch(model, spec, batch_size)
    short = make_batch(model, spec, 1, short=True)
    with torch.no_grad():
        model(short), hf(**short.inputs)          # lazy initialisation
        last_tl = model.last_logits(batch)
        last_hf = batch.last_of(hf(**batch.inputs, logits_to_keep=batch.logits_to_keep).logits)
    parity = (last_tl.float() - last_hf.float()).abs().max().item()
    fns = operations(spec, model, hf, batch, new_tokens)
    wall: dict[str, list[float]] = {op: [] for op in ops}
    cpu: dict[str, list[float]] = {op: [] for op in ops}
    paths: dict[str, list[str]] = {}
    for r in range(reps):
        order = ops[r % len(ops):] + ops[:r % len(ops)]
        for op in order:
            gc.collect()
            with torch.no_grad(), record_paths() as seen:
                t0, c0 = time.perf_counter(), time.process_time()
                out = fns[op]()
                wall[op].append(time.perf_counter() - t0)
                cpu[op].append(time.process_time() - c0)
            del out
            paths.setdefault(op, sorted(set(seen)))
    return {"seq": batch.input_ids.shape[1], "parity_last_logits": parity, "wall": wall,
            "cpu": cpu, "paths": paths, "threads": torch.get_num_threads()}


def child_memory(spec: ModelSpec, path: str, dtype: str, batch_size: int, op: str) -> dict:
    import torch

    hf_side = op.startswith("hf")
    model = load_tl(path, dtype)
    batch = make_batch(model, spec, batch_size)
    short = make_batch(model, spec, 1, short=True)
    hf = None
    if hf_side:   # the baseline: plain HF, loaded as users do (the bridge only made the batch)
        del model
        gc.collect()
        hf = load_hf(path, dtype)
        model = None
    fn = operations(spec, model, hf, batch)[op]
    with torch.no_grad():
        (hf(**short.inputs) if hf_side else model(short))   # lazy initialisation
        del short
        gc.collect()
        Path("/proc/self/clear_refs").write_text("5")
        before = _status_kb("VmRSS")
        out = fn()
        peak = _status_kb("VmHWM")
    del out
    return {"seq": batch.input_ids.shape[1], "added_mib": (peak - before) / 1024,
            "rss_before_mib": before / 1024}


def child_sweep(spec: ModelSpec, path: str, batch_size: int, reps: int) -> dict:
    import torch

    from tl_vlm.analyses.patching import patch_gate

    model = load_tl(path, "fp32")
    target = make_batch(model, spec, batch_size, seed=0)
    source = make_batch(model, spec, batch_size, seed=100)
    variants: dict[str, Callable] = {
        "naive": lambda: patch_gate(model, source, target, reuse_prefix=False).logits,
        "prefix": lambda: patch_gate(model, source, target, reuse_prefix=True).logits,
    }
    try:
        import nnsight
    except ImportError:
        nnsight = None
    if nnsight is not None:
        variants["nnsight_naive"] = nnsight_sweep(nnsight, hf_twin(model), source, target,
                                                  model.cfg.n_layers)
    with torch.no_grad():
        model(make_batch(model, spec, 1, short=True))
    wall: dict[str, list[float]] = {v: [] for v in variants}
    cpu: dict[str, list[float]] = {v: [] for v in variants}
    logits = {}
    names = list(variants)
    for r in range(reps):
        for v in names[r % len(names):] + names[:r % len(names)]:
            gc.collect()
            t0, c0 = time.perf_counter(), time.process_time()
            logits[v] = variants[v]()
            wall[v].append(time.perf_counter() - t0)
            cpu[v].append(time.process_time() - c0)
    agree = max((logits[v] - logits["naive"]).abs().max().item() for v in logits)
    return {"seq": target.input_ids.shape[1], "layers": model.cfg.n_layers, "wall": wall,
            "cpu": cpu, "max_diff": agree,
            "nnsight": None if nnsight is None else nnsight.__version__}


def nnsight_sweep(nnsight, hf, source, target, n_layers: int) -> Callable:
    """The naive gate-patching sweep written with nnsight (as a user of it would)."""
    import torch

    gate = target.positions.gate.mask.nonzero()
    rows, cols = gate[:, 0], gate[:, 1]
    src_gate = source.positions.gate.mask.nonzero()
    s_rows, s_cols = src_gate[:, 0], src_gate[:, 1]
    wrapped = nnsight.NNsight(hf)
    layers = wrapped.model.layers
    keep_s, keep_t = source.logits_to_keep, target.logits_to_keep

    def sweep():
        with torch.no_grad():
            saved = []
            with wrapped.trace(**source.inputs, logits_to_keep=keep_s):
                for layer in range(n_layers):
                    saved.append(layers[layer].input[s_rows, s_cols].save())
            with wrapped.trace(**target.inputs, logits_to_keep=keep_t):
                clean = wrapped.lm_head.output.save()
            patched = []
            for layer in range(n_layers):
                with wrapped.trace(**target.inputs, logits_to_keep=keep_t):
                    layers[layer].input[rows, cols] = saved[layer]
                    out = wrapped.lm_head.output.save()
                patched.append(target.last_of(out))
            del clean
            return torch.stack(patched)

    return sweep


CHILDREN = {"build": child_build, "time": child_time, "memory": child_memory,
            "sweep": child_sweep}


# ---------------------------------------------------------------------------------------
# Orchestration
# ---------------------------------------------------------------------------------------
@dataclass
class Runner:
    workdir: Path
    results: Path
    threads: int
    log: list = field(default_factory=list)

    def child(self, kind: str, spec: ModelSpec, path: Path, *, memory: bool = False,
              **kwargs: Any) -> dict:
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                   PYTHONPATH=str(ROOT), OMP_NUM_THREADS=str(self.threads),
                   TOKENIZERS_PARALLELISM="false")
        if memory:
            env["MALLOC_MMAP_THRESHOLD_"] = "65536"
        payload = json.dumps({"kind": kind, "spec": asdict(spec), "path": str(path),
                              "kwargs": kwargs})
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, __file__, "--child", payload], cwd=ROOT,
                              env=env, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"{kind} {spec.name} {kwargs} failed:\n{proc.stderr[-4000:]}")
        out = json.loads(proc.stdout.strip().splitlines()[-1])
        record = {"kind": kind, "model": spec.name, **kwargs, **out,
                  "elapsed_s": time.perf_counter() - t0, "load": os.getloadavg()[0]}
        with self.results.open("a") as f:
            f.write(json.dumps(record) + "\n")
        print(f"[{time.strftime('%H:%M:%S')}] {kind} {spec.name} "
              f"{ {k: v for k, v in kwargs.items() if k != 'ops'} } "
              f"done in {record['elapsed_s']:.0f} s (load {record['load']:.1f})", flush=True)
        return record

    def built(self, spec: ModelSpec) -> Path:
        path = self.workdir / spec.key()
        if not (path / "BUILT").exists():
            path.mkdir(parents=True, exist_ok=True)
            self.child("build", spec, path)
        return path


def run_child(payload: str) -> None:
    sys.path.insert(0, str(ROOT))
    import warnings

    warnings.filterwarnings("ignore")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    job = json.loads(payload)
    spec = ModelSpec(**{k: tuple(v) if k == "ops" else v for k, v in job["spec"].items()})
    print(json.dumps(CHILDREN[job["kind"]](spec, job["path"], **job["kwargs"])))


def machine() -> dict:
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")),
               platform.processor())
    mem = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
               if line.startswith("MemTotal"))
    return {"cpu": cpu, "cores": os.cpu_count(), "mem_gib": round(mem / 2**20, 1),
            "torch": torch.__version__, "python": platform.python_version()}


def main(args: argparse.Namespace) -> None:
    specs = model_specs(args.quick)
    args.workdir.mkdir(parents=True, exist_ok=True)
    results = args.results or Path(tempfile.gettempdir()) / \
        f"real_scale-{time.strftime('%Y%m%d-%H%M%S')}.jsonl"
    runner = Runner(args.workdir, results, args.threads)
    with results.open("a") as f:
        f.write(json.dumps({"kind": "run", "argv": sys.argv[1:], "machine": machine(),
                            "quick": args.quick, "started": datetime.datetime.now().isoformat(
                                timespec="seconds"), "load": os.getloadavg()}) + "\n")
    print(f"results -> {results}", flush=True)
    for name in args.models:
        spec = specs[name]
        if args.ops:
            wanted = set(args.ops) | {BASELINE[op] for op in args.ops if op in BASELINE}
            spec = replace(spec, ops=tuple(op for op in spec.ops if op in wanted))
        path = runner.built(spec)
        for dtype in args.dtypes:
            for b in ([] if args.skip_timing else args.timing_batches):
                new_tokens = (args.new_tokens if name == "chameleon-7b" and dtype == "fp32"
                              and (not args.ops or "generate" in args.ops) else 0)
                ops = list(spec.ops) + (["hf_generate", "generate_knockout"] if new_tokens else [])
                runner.child("time", spec, path, dtype=dtype, batch_size=b, reps=args.reps,
                             ops=ops, new_tokens=new_tokens)
            for b in args.batches:
                for op in spec.ops:
                    if args.skip_memory:
                        break
                    runner.child("memory", spec, path, memory=True, dtype=dtype, batch_size=b,
                                 op=op)
    if args.sweep:
        spec = specs["sweep"]
        runner.child("sweep", spec, runner.built(spec), batch_size=args.sweep_batch,
                     reps=args.reps)
    render(results, args.out)


# ---------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------
def _fmt(ratio: Optional[float], target: Optional[float]) -> str:
    if ratio is None:
        return "--"
    mark = "" if target is None else (" ✓" if ratio <= target else " ✗")
    return f"{ratio:.2f}x{mark}"


def render(results: Path, out: Optional[Path]) -> str:
    records = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
    runs = [r for r in records if r["kind"] == "run"]
    timing = [r for r in records if r["kind"] == "time"]
    memory = {(r["model"], r["dtype"], r["batch_size"], r["op"]): r
              for r in records if r["kind"] == "memory"}
    sweeps = [r for r in records if r["kind"] == "sweep"]
    info = runs[0]["machine"] if runs else machine()
    loads = [r["load"] for r in records if "load" in r and not isinstance(r["load"], list)]
    quick = any(r.get("quick") for r in runs)
    specs = model_specs(quick)
    lines = [
        f"Measured {runs[0]['started'] if runs else '?'} on {info['cpu']}, {info['cores']} "
        f"cores, {info['mem_gib']} GiB, torch {info['torch']}"
        + (f"; load average during the run {min(loads):.1f}-{max(loads):.1f}" if loads else "")
        + ". Command(s): " + "; ".join(f"`python benchmarks/real_scale.py {' '.join(r['argv'])}`"
                                       for r in runs) + ".",
        "",
        "Ratios tl_vlm / Hugging Face `attn_implementation=\"sdpa\"` on the same input (✓/✗: "
        "issue 9's target). Time: min and median wall-clock of interleaved repetitions, and "
        "median process CPU time (steadier when other processes share the cores); memory: "
        "peak added over the loaded model, each in a fresh process.",
        "",
    ]
    seen_models = []
    for r in timing + list(memory.values()):
        if r["model"] not in seen_models:
            seen_models.append(r["model"])
    for name in seen_models:
        spec = specs[name]
        seqs = {r["seq"] for r in timing + list(memory.values()) if r["model"] == name}
        lines += [f"**{name}**: {spec.describe}; {', '.join(map(str, sorted(seqs)))} tokens per "
                  "example.", ""]
        combos = sorted({(r["dtype"], r["batch_size"]) for r in timing + list(memory.values())
                         if r["model"] == name}, key=lambda c: (c[0] != "fp32", c[1]))
        header = "| operation | baseline |"
        rule = "|---|---|"
        for dtype, b in combos:
            header += f" {dtype} b{b} time min | median | CPU median | memory |"
            rule += "---|---|---|---|"
        lines += [header, rule]
        ops = [op for op in BASELINE if any(
            op in r.get("wall", {}) for r in timing if r["model"] == name) or any(
            k[0] == name and k[3] == op for k in memory)]
        for op in ops:
            base = BASELINE[op]
            t_target, m_target = TARGETS[op]
            row = f"| {op} | {base} |"
            for dtype, b in combos:
                t = next((r for r in timing if (r["model"], r["dtype"], r["batch_size"])
                          == (name, dtype, b) and op in r["wall"]), None)
                if t is not None and base in t["wall"]:
                    tmin = min(t["wall"][op]) / min(t["wall"][base])
                    tmed = statistics.median(t["wall"][op]) / statistics.median(t["wall"][base])
                    cmed = statistics.median(t["cpu"][op]) / statistics.median(t["cpu"][base])
                    row += (f" {_fmt(tmin, t_target)} | {_fmt(tmed, t_target)} |"
                            f" {_fmt(cmed, t_target)} |")
                else:
                    row += " -- | -- | -- |"
                m, mb = memory.get((name, dtype, b, op)), memory.get((name, dtype, b, base))
                ratio = (m["added_mib"] / mb["added_mib"]
                         if m and mb and mb["added_mib"] >= 1 else None)
                row += f" {_fmt(ratio, m_target)} |"
            lines.append(row)
        lines.append("")
        base_rows = []
        for dtype, b in combos:
            t = next((r for r in timing if (r["model"], r["dtype"], r["batch_size"])
                      == (name, dtype, b)), None)
            parts = []
            for base in ("hf", "hf_last", "hf_generate", "hf_gradient"):
                if t is not None and base in t["wall"]:
                    parts.append(f"{base} {statistics.median(t['wall'][base]):.1f} s")
                if (name, dtype, b, base) in memory:
                    parts.append(f"{base} +{memory[(name, dtype, b, base)]['added_mib']:.0f} MiB")
            if t is not None:
                parts.append(f"max |tl - hf| of last logits {t['parity_last_logits']:.1e}; "
                             f"{len(next(iter(t['wall'].values())))} repetitions, "
                             f"{t['threads']} torch thread(s)")
                fused = {op: p for op, p in t["paths"].items() if p and p != ["sdpa"]}
                if fused:
                    parts.append("attention paths " + ", ".join(
                        f"{op}: {'/'.join(p)}" for op, p in fused.items()))
            if parts:
                base_rows.append(f"- {dtype} b{b}: " + "; ".join(parts))
        lines += ["Baselines (absolute):", *base_rows, ""]
    for s in sweeps:
        spec = specs["sweep"]
        med = {v: statistics.median(w) for v, w in s["wall"].items()}
        mins = {v: min(w) for v, w in s["wall"].items()}
        lines += [f"**Layer sweep of gate patching** (`patch_gate(..., layers=\"all\")`, "
                  f"resid_pre): {spec.describe}; batch {s['batch_size']} x {s['seq']} tokens, "
                  f"{len(s['wall']['naive'])} interleaved repetitions.", "",
                  "| sweep | min | median | vs naive (median) |", "|---|---|---|---|"]
        for v in s["wall"]:
            ratio = med[v] / med["naive"]
            mark = " ✓" if v == "prefix" and ratio <= 0.6 else " ✗" if v == "prefix" else ""
            lines.append(f"| {v} | {mins[v]:.1f} s | {med[v]:.1f} s | {ratio:.2f}x{mark} |")
        lines += ["", f"Largest difference between the sweeps' patched logits: "
                      f"{s['max_diff']:.1e}"
                  + (f"; nnsight {s['nnsight']}." if s.get("nnsight") else
                     "; nnsight not installed (skipped)."), ""]
    text = "\n".join(lines)
    print(text)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
        print(f"written to {out}")
    return text


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="Chameleon-7B width at ~330 tokens, fp32, batch 1, 2 repetitions, "
                             "4 generated tokens, sweep at hidden 256, batch 1")
    parser.add_argument("--models", nargs="*", choices=["chameleon-7b", "qwen2-vl-7b"])
    parser.add_argument("--ops", nargs="+", choices=[*FULL_OPS, "generate"],
                        help="only these operations (baselines are added)")
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES))
    parser.add_argument("--batches", nargs="+", type=int, help="batch sizes for memory")
    parser.add_argument("--timing-batches", nargs="+", type=int, help="batch sizes for time")
    parser.add_argument("--reps", type=int, help="interleaved repetitions")
    parser.add_argument("--new-tokens", type=int,
                        help="tokens generated (Chameleon, fp32; default 8, --quick 4); 0 skips")
    parser.add_argument("--no-sweep", dest="sweep", action="store_false")
    parser.add_argument("--sweep-batch", type=int)
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--skip-timing", action="store_true")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--workdir", type=Path,
                        help="where models are built (kept and reused; default: a temporary "
                             "directory)")
    parser.add_argument("--results", type=Path, help="JSON-lines file to append to")
    parser.add_argument("--out", type=Path, default=RESULTS_MD, help="markdown table")
    parser.add_argument("--render", type=Path, help="only render this results file")
    args = parser.parse_args(argv)
    full = dict(models=["chameleon-7b", "qwen2-vl-7b"], dtypes=["fp32", "bf16"],
                batches=[1, 4], timing_batches=[1, 4], reps=3, sweep_batch=4, new_tokens=8)
    quick = dict(models=["chameleon-7b"], dtypes=["fp32"], batches=[1], timing_batches=[1],
                 reps=2, sweep_batch=1, new_tokens=4)
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        run_child(sys.argv[2])
    else:
        arguments = parse_args()
        if arguments.render:
            render(arguments.render, arguments.out)
        elif arguments.workdir is None:
            with tempfile.TemporaryDirectory() as tmp:
                arguments.workdir = Path(tmp)
                main(arguments)
        else:
            main(arguments)
