"""Loading: errors that say what to do, offline local loads, TL registration, no installs."""

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch

from tl_vlm.adapters import UnsupportedModelError, family_for_config, families


def test_every_family_module_registers_one_family():
    names = [f.name for f in families()]
    assert len(names) == len(set(names))
    for fam in families():
        assert fam.architectures and fam.layout is not None and fam.adapter is not None


def test_unknown_architecture_lists_the_supported_ones(tiny_zoo, tmp_path):
    src = tiny_zoo.path("llava")
    cfg = json.loads((src / "config.json").read_text())
    cfg["architectures"] = ["VilaUForCausalLM"]
    for f in src.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    from tl_vlm import HookedVLM

    with pytest.raises(UnsupportedModelError, match=r"VilaUForCausalLM(.|\n)*llava"):
        HookedVLM.from_pretrained(str(tmp_path))


def test_missing_processor_is_a_clear_error(tiny_zoo, tmp_path):
    src = tiny_zoo.path("llava")
    for f in src.iterdir():
        if "processor" not in f.name and "tokenizer" not in f.name:
            (tmp_path / f.name).write_bytes(f.read_bytes())
    from tl_vlm import HookedVLM

    with pytest.raises(OSError, match="processor"):
        HookedVLM.from_pretrained(str(tmp_path))


def test_local_directory_loads_with_the_network_cut(tiny_zoo, monkeypatch):
    """A local path never touches the network, even without offline env vars."""
    path = tiny_zoo.path("llava")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    from tl_vlm import HookedVLM

    model = HookedVLM.from_pretrained(str(path))
    assert model.family.name == "llava"
    assert os.environ.get("HF_HUB_OFFLINE") is None  # restored afterwards


def test_hook_name_typos_raise(tiny_zoo):
    model = tiny_zoo.model("llava")
    spec = tiny_zoo.specs["llava"]
    batch = model.prepare(spec.prompts, images=spec.images)
    with pytest.raises(KeyError, match="hook_patern"):
        model.run_with_hooks(batch, fwd_hooks=[("blocks.0.attn.hook_patern", lambda x, hook: x)])
    with pytest.raises(KeyError, match="blocks.9"):
        model.run_with_hooks(batch, fwd_hooks=[("blocks.9.attn.hook_pattern", lambda x, hook: x)])


def test_tl_processor_fallback_never_installs():
    from tl_vlm.core import registration
    from tl_vlm.core.compat import tl_torchvision_installer

    registration.ensure_registered()   # what tl_vlm runs before it boots anything

    calls = []
    real = subprocess.check_call
    subprocess.check_call = lambda *a, **k: calls.append(a)  # would be a pip install
    try:
        tl_torchvision_installer()()
    finally:
        subprocess.check_call = real
    assert calls == []
    import importlib.util

    assert tl_torchvision_installer()() == (importlib.util.find_spec("torchvision") is not None)


def test_generate_refuses_right_padding(tiny_zoo):
    model = tiny_zoo.model("llava")
    spec = tiny_zoo.specs["llava"]
    batch = model.prepare(spec.prompts, images=spec.images, padding_side="right")
    with pytest.raises(ValueError, match="left padding"):
        model.generate(batch, max_new_tokens=2)


PLAIN_BOOT = """
import inspect, json, sys
import torch, transformers
from transformer_lens.model_bridge import TransformerBridge
from transformer_lens.factories import architecture_adapter_factory as factory
assert "tl_vlm.core.model" not in sys.modules, "the user imported nothing from tl_vlm"
report = {}
for family, (path, inputs) in torch.load(sys.argv[1], weights_only=False).items():
    bridge = TransformerBridge.boot_transformers(path, device="cpu")
    ref = getattr(transformers, type(bridge.original_model).__name__).from_pretrained(
        path, attn_implementation="eager").eval()
    with torch.no_grad():
        expected = ref(**inputs).logits
        kwargs = {k: v for k, v in inputs.items() if k != "input_ids"}
        got = bridge(inputs["input_ids"], **kwargs)
        halve = lambda pattern, hook: pattern * 0.5
        edited = bridge.run_with_hooks(inputs["input_ids"], **kwargs,
                                       fwd_hooks=[("blocks.0.attn.hook_pattern", halve)])
    mask = inputs["attention_mask"].bool()
    report[family] = dict(adapter=type(bridge.adapter).__module__ + ":" + type(bridge.adapter).__name__,
                          max_diff=float((got[mask] - expected[mask]).abs().max()),
                          live=float((edited[mask] - got[mask]).abs().max()))
table = {name: (cls.__name__, inspect.getsourcefile(cls), cls.__module__)
         for name, cls in factory.SUPPORTED_ARCHITECTURES.items()}
print(json.dumps(dict(report=report, table=table)))
"""


def _plain_boot(tiny_zoo, tmp_path, names, **env_extra) -> tuple[dict, str]:
    """Boot ``names`` with plain TransformerLens in a fresh interpreter (no tl_vlm import)."""
    inputs = {family: (str(tiny_zoo.path(family)), tiny_zoo.batch(family)[1].inputs)
              for family in names}
    torch.save(inputs, tmp_path / "inputs.pt")
    env = {k: v for k, v in os.environ.items() if k != "TL_VLM_PATCH_TRANSFORMER_LENS"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", **env_extra)
    done = subprocess.run([sys.executable, "-c", PLAIN_BOOT, str(tmp_path / "inputs.pt")],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "attempted to override" not in done.stderr and "could not register" not in done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr


def _check_exact_and_live(report: dict, names) -> None:
    assert sorted(report) == sorted(names)
    for family, r in report.items():
        assert r["adapter"].startswith("tl_vlm.adapters."), (family, r)
        assert r["max_diff"] < 1e-4, (family, r)
        assert r["live"] > 1e-4, (family, r)


def test_plain_transformer_lens_gains_the_families_it_lacks_and_keeps_its_own(tiny_zoo, tmp_path):
    """After `pip install tl-vlm`, TL itself boots the architectures it lacks (Chameleon,
    Janus, Qwen2-VL) with tl_vlm's adapters, exactly and with live hooks, in a fresh
    interpreter; the architectures TL supports keep TL's own adapters."""
    from tl_vlm.core import registration

    added = set(registration.added_architectures())
    names = [f.name for f in families() if set(f.architectures) <= added]
    assert sorted(names) == ["aya_vision", "chameleon", "internvl", "janus", "paligemma",
                             "qwen2_vl", "smolvlm"]
    out, _ = _plain_boot(tiny_zoo, tmp_path, names)
    _check_exact_and_live(out["report"], names)
    for name, (cls_name, source, module) in out["table"].items():
        assert cls_name and source and source.endswith(".py"), (name, cls_name, source)
        assert module.startswith("tl_vlm.") == (name in added), (name, module)
    assert out["table"]["LlavaForConditionalGeneration"][2].startswith("transformer_lens.")


def test_plain_transformer_lens_patched_boots_every_family_exactly_with_live_hooks(tiny_zoo, tmp_path):
    """With TL_VLM_PATCH_TRANSFORMER_LENS=1, TL itself boots every family with tl_vlm's
    adapters: logits equal to HF eager, live attention hooks, real classes in its table."""
    out, _ = _plain_boot(tiny_zoo, tmp_path, list(tiny_zoo.specs), TL_VLM_PATCH_TRANSFORMER_LENS="1")
    _check_exact_and_live(out["report"], tiny_zoo.specs)
    assert out["report"]["pixtral"]["adapter"].endswith(":PixtralAdapter")
    for name, (cls_name, source, _) in out["table"].items():
        assert cls_name and source and source.endswith(".py"), (name, cls_name, source)


def test_patch_transformer_lens_in_process():
    """``tl_vlm.patch_transformer_lens()`` puts tl_vlm's adapters in TL's table for the
    architectures TL supports too (a fresh interpreter: the table is process-wide)."""
    script = ("import tl_vlm\n"
              "from transformer_lens.factories import architecture_adapter_factory as f\n"
              "before = f.SUPPORTED_ARCHITECTURES['LlavaForConditionalGeneration'].__module__\n"
              "changed = tl_vlm.patch_transformer_lens()\n"
              "after = f.SUPPORTED_ARCHITECTURES['LlavaForConditionalGeneration'].__module__\n"
              "print(before, after, 'LlavaForConditionalGeneration' in changed)\n")
    env = {k: v for k, v in os.environ.items() if k != "TL_VLM_PATCH_TRANSFORMER_LENS"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=dict(env, HF_HUB_OFFLINE="1"), timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    before, after, changed = done.stdout.split()[-3:]
    assert before.startswith("transformer_lens.") and after.startswith("tl_vlm.")
    assert changed == "True"


# -- placement and dtypes ------------------------------------------------------------
@pytest.mark.parametrize("kwargs, match", [
    (dict(device="cpu", device_map="auto"), "either one device .* or a device map"),
    (dict(device="cpu", n_devices=2), "either one device"),
    (dict(device_map="auto", n_devices=2), "device_map or n_devices, not both"),
    (dict(n_devices=0), "positive integer"),
    (dict(max_memory={"cpu": "1GiB"}), "only apply when the model is split"),
])
def test_placement_arguments_are_checked_before_loading(kwargs, match):
    from tl_vlm import HookedVLM

    with pytest.raises(ValueError, match=match):
        HookedVLM.from_pretrained("toy-gated", **kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_cuda_without_cuda_says_so():
    from tl_vlm import HookedVLM

    with pytest.raises(ValueError, match="CUDA is not available.*device='cpu'"):
        HookedVLM.from_pretrained("toy-gated", device="cuda")
    with pytest.raises(ValueError, match="needs 2 CUDA GPUs; this machine has 0"):
        HookedVLM.from_pretrained("toy-gated", n_devices=2)


def test_dtype_names():
    from tl_vlm import HookedVLM

    for name in ("bfloat16", "bf16", torch.bfloat16):
        assert HookedVLM.from_pretrained("toy-gated", dtype=name).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="'float8' is not supported.*bfloat16"):
        HookedVLM.from_pretrained("toy-gated", dtype="float8")


def test_model_names_that_cannot_be_right(tmp_path):
    from tl_vlm import HookedVLM

    with pytest.raises(ValueError, match="did you mean the shipped toy model 'toy-gated'"):
        HookedVLM.from_pretrained("toy_gated")
    with pytest.raises(FileNotFoundError, match="no checkpoint directory"):
        HookedVLM.from_pretrained(str(tmp_path / "nope" / "model"))


def test_a_processor_can_be_given_for_a_checkpoint_saved_without_one(tiny_zoo, tmp_path):
    src = tiny_zoo.path("llava")
    for f in src.iterdir():
        if "processor" not in f.name and "tokenizer" not in f.name and "chat" not in f.name:
            (tmp_path / f.name).write_bytes(f.read_bytes())
    from tl_vlm import HookedVLM

    with pytest.raises(OSError, match="processor='<hub id or directory"):
        HookedVLM.from_pretrained(str(tmp_path))
    by_path = HookedVLM.from_pretrained(str(tmp_path), processor=str(src))
    by_object = HookedVLM.from_pretrained(str(tmp_path), processor=tiny_zoo.model("llava").processor)
    spec = tiny_zoo.specs["llava"]
    for model in (by_path, by_object):
        batch = model.prepare(spec.prompts, images=spec.images)
        torch.testing.assert_close(model(batch), tiny_zoo.model("llava")(batch))


def test_vision_towers_run_the_default_attention(tiny_zoo, family):
    """Only the text decoder runs tl_vlm's hooked attention; towers keep HF's default."""
    from transformers import PreTrainedModel

    from tl_vlm.core.attention import ATTN_IMPLEMENTATION
    from tl_vlm.core.compat import attn_implementation

    hf = tiny_zoo.model(family).hf_model
    text = hf.config.get_text_config()
    assert attn_implementation(text) == ATTN_IMPLEMENTATION
    towers = {path: attn_implementation(m.config) for path, m in hf.named_modules()
              if isinstance(m, PreTrainedModel) and m.config is not text and m.config is not hf.config}
    assert all(impl in ("sdpa", "eager") for impl in towers.values()), towers


def test_models_are_freed(tiny_zoo):
    """del + gc.collect() frees a model and every weight, three loads in a row."""
    import gc
    import weakref

    from tl_vlm import HookedVLM

    spec = tiny_zoo.specs["qwen2_vl"]
    refs = []
    for _ in range(3):
        model = HookedVLM.from_pretrained(str(tiny_zoo.path("qwen2_vl")))
        batch = model.prepare(spec.prompts, images=spec.images, padding_side="left")
        model.run_with_cache(batch)
        model.generate(batch, max_new_tokens=2)
        refs.append([weakref.ref(model), weakref.ref(model.hf_model)]
                    + [weakref.ref(p) for p in model.hf_model.parameters()])
        del model, batch
        gc.collect()
    alive = [sum(r() is not None for r in group) for group in refs]
    assert alive == [0, 0, 0], f"objects still alive per load: {alive}"


def test_onevision_without_its_processor_config_says_what_to_do(tiny_zoo, tmp_path):
    src = tiny_zoo.path("llava_onevision")
    for f in src.iterdir():
        if f.name != "processor_config.json":
            (tmp_path / f.name).write_bytes(f.read_bytes())
    from tl_vlm import HookedVLM

    with pytest.raises(OSError, match=r"could not load the processor from .*needs the processor "
                                      r".*pass the base model's processor: from_pretrained\(path, processor="):
        HookedVLM.from_pretrained(str(tmp_path))
    model = HookedVLM.from_pretrained(str(tmp_path), processor=str(src))
    assert model.family.name == "llava_onevision"


def test_layout_errors_name_expected_found_and_what_to_do(toy_models):
    from tl_vlm.core.layout import LayoutError
    from tl_vlm.toy import make_examples

    model = toy_models["toy-gated"]
    prompt = make_examples(1).prompts[0]
    with pytest.raises(LayoutError, match=r"expected BOI '<racm3:break>' \(id \d+\) right before .* "
                                          r"but found 'what' .* placeholder '<image>'"):
        model.prepare([prompt.replace("<racm3:break>", "what")])
    with pytest.raises(LayoutError, match=r"expected EOI '<eoss>' .* but found 'what'.*truncated"):
        model.prepare([prompt.replace("<eoss>", "what")])


@pytest.mark.parametrize("first", ["transformer_lens", "tl_vlm.core.attention", "tl_vlm.core.attention_edits",
                                   "tl_vlm.adapters", "tl_vlm.adapters.llava", "tl_vlm.core.model",
                                   "tl_vlm.analyses", "tl_vlm.core.family", "tl_vlm.core.registration",
                                   "tl_vlm.core.attention_bridge", "tl_vlm"])
def test_registration_whatever_is_imported_first(first):
    """Whichever module a user imports first, TL's table ends up holding tl_vlm's adapter
    classes for the architectures TL lacks and TL's own for the others, and nothing
    warns (no circular import on the way)."""
    script = textwrap.dedent(f"""
        import {first}
        import transformer_lens
        from transformer_lens.factories import architecture_adapter_factory as factory
        table = factory.SUPPORTED_ARCHITECTURES
        print(table["ChameleonForConditionalGeneration"].__module__,
              table["LlavaForConditionalGeneration"].__name__)
    """)
    env = {k: v for k, v in os.environ.items() if k != "TL_VLM_PATCH_TRANSFORMER_LENS"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    done = subprocess.run([sys.executable, "-W", "error::UserWarning", "-c", script],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["tl_vlm.adapters.chameleon", "LlavaArchitectureAdapter"]


def test_a_hub_id_that_cannot_load_fails_in_seconds(monkeypatch):
    """No network (or offline mode) and not in the local cache: one line, no retries."""
    import time

    from tl_vlm import HookedVLM
    from tl_vlm.core.loading import HubUnreachableError

    start = time.perf_counter()
    with pytest.raises(HubUnreachableError, match="org/model: the Hugging Face hub cannot be "
                                                  "reached .* not in the local cache"):
        HookedVLM.from_pretrained("org/model")
    assert time.perf_counter() - start < 10
    with pytest.raises(ValueError, match="did you mean the shipped toy model 'toy-gated'"):
        HookedVLM.from_pretrained("toy-gatd")
