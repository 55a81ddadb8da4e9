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
    import tl_vlm._tl_compat  # noqa: F401  (applies the guard on import)
    from transformer_lens.model_bridge.sources.transformers import helpers

    calls = []
    real = subprocess.check_call
    subprocess.check_call = lambda *a, **k: calls.append(a)  # would be a pip install
    try:
        helpers._ensure_torchvision()
    finally:
        subprocess.check_call = real
    assert calls == []
    import importlib.util

    assert helpers._ensure_torchvision() == (importlib.util.find_spec("torchvision") is not None)


def test_generate_refuses_right_padding(tiny_zoo):
    model = tiny_zoo.model("llava")
    spec = tiny_zoo.specs["llava"]
    batch = model.prepare(spec.prompts, images=spec.images, padding_side="right")
    with pytest.raises(ValueError, match="left padding"):
        model.generate(batch, max_new_tokens=2)


def test_plain_boot_transformers_finds_chameleon_without_importing_tl_vlm(tiny_zoo):
    """After `pip install tl-vlm`, TL itself boots Chameleon in a fresh interpreter."""
    path = tiny_zoo.path("chameleon")
    script = textwrap.dedent(f"""
        import sys
        from transformer_lens.model_bridge import TransformerBridge
        assert "tl_vlm.adapters" not in sys.modules, "the user imported nothing from tl_vlm"
        bridge = TransformerBridge.boot_transformers({str(path)!r}, device="cpu")
        print(type(bridge.adapter).__module__, type(bridge.adapter).__name__)
        ids = bridge.tokenizer("what is this", return_tensors="pt").input_ids
        print(tuple(bridge(ids).shape))
    """)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "tl_vlm.adapters.chameleon ChameleonAdapter" in done.stdout
