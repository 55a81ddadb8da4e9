"""Shared fixtures: tiny models built once per session, loaded through the public API."""

from __future__ import annotations

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest
import torch

torch.set_num_threads(1)  # tiny models: threads only add contention on 2 cores

from tests.tiny import specs


class TinyZoo:
    """Builds each family's tiny checkpoint on first request; caches paths and models."""

    def __init__(self, root) -> None:
        self.root = root
        self.specs = specs()
        self._paths: dict = {}
        self._models: dict = {}

    def path(self, name: str):
        if name not in self._paths:
            target = self.root / name
            target.mkdir()
            torch.manual_seed(0)
            self.specs[name].build(target)
            self._paths[name] = target
        return self._paths[name]

    def model(self, name: str):
        """The HookedVLM of a family (shared; tests must not leave hooks on it)."""
        if name not in self._models:
            from tl_vlm import HookedVLM

            self._models[name] = HookedVLM.from_pretrained(str(self.path(name)))
        return self._models[name]

    def batch(self, name: str, images=None, **prepare_kwargs):
        """(model, its spec's batch); ``images`` replaces the spec's pictures."""
        spec, model = self.specs[name], self.model(name)
        return model, model.prepare(spec.prompts, images=images or spec.images, **prepare_kwargs)

    def deeper(self, name: str, n_layers: int = 4):
        """A variant of a family's tiny model with ``n_layers`` decoder layers (the extra
        ones random), for tests that need to skip several blocks in a row."""
        key = (name, n_layers)
        if key not in self._models:
            import json
            import shutil

            from tl_vlm import HookedVLM

            target = self.root / f"{name}-{n_layers}-layers"
            shutil.copytree(self.path(name), target)
            cfg = json.loads((target / "config.json").read_text())
            (cfg["text_config"] if "text_config" in cfg else cfg)["num_hidden_layers"] = n_layers
            (target / "config.json").write_text(json.dumps(cfg))
            torch.manual_seed(0)
            self._models[key] = HookedVLM.from_pretrained(str(target))
        return self._models[key]

    def variant_path(self, name: str, label: str, **build_kwargs):
        """The directory of the family's tiny model built with other arguments."""
        target = self.root / f"{name}-{label}"
        if (name, label) not in self._paths:
            target.mkdir()
            torch.manual_seed(0)
            self.specs[name].build(target, **build_kwargs)
            self._paths[(name, label)] = target
        return target

    def variant(self, name: str, label: str, **build_kwargs):
        """The family's tiny model built with other arguments (e.g. another tokenizer)."""
        key = (name, label)
        if key not in self._models:
            from tl_vlm import HookedVLM

            path = self.variant_path(name, label, **build_kwargs)
            self._models[key] = HookedVLM.from_pretrained(str(path))
        return self._models[key]

    def offloaded(self, name: str):
        """The family's tiny model (or a shipped toy model, by name) loaded with its last
        half of decoder layers offloaded to "disk" by accelerate and the rest on "cpu"."""
        key = ("offloaded", name)
        if key not in self._models:
            from tl_vlm import HookedVLM
            from tl_vlm.toy import is_toy_model, toy_model_path

            path = toy_model_path(name) if is_toy_model(name) else self.path(name)
            device_map = half_on_disk(path)
            folder = self.root / f"offload-{name}"
            self._models[key] = HookedVLM.from_pretrained(str(path), device_map=device_map,
                                                          offload_folder=str(folder))
        return self._models[key]

    def reference(self, name: str):
        """The plain HF model, eager attention, as numerical reference."""
        spec = self.specs[name]
        import transformers

        return getattr(transformers, spec.hf_class).from_pretrained(str(self.path(name)),
                                               attn_implementation="eager").eval()


def half_on_disk(path) -> dict:
    """A device map for the checkpoint at ``path``: the last half of every layer stack
    (the text decoder's, and a vision tower's) on "disk", everything else on "cpu"."""
    import transformers
    from accelerate import init_empty_weights

    config = transformers.AutoConfig.from_pretrained(path)
    with init_empty_weights():
        hf = getattr(transformers, config.architectures[0])(config)
    stacks = [m for m in hf.modules() if isinstance(m, torch.nn.ModuleList) and len(m) > 1
              and type(m[0]).__name__.endswith(("Layer", "Block"))]
    device_map: dict = {}

    def place(module, prefix):
        for name, _ in module.named_parameters(recurse=False):
            device_map[f"{prefix}{name}"] = "cpu"
        for name, child in module.named_children():
            path = f"{prefix}{name}"
            if any(child is s for s in stacks):
                for i in range(len(child)):
                    device_map[f"{path}.{i}"] = "disk" if i >= len(child) // 2 else "cpu"
            elif any(m is s for m in child.modules() for s in stacks):
                place(child, path + ".")
            else:
                device_map[path] = "cpu"

    place(hf, "")
    return device_map


@pytest.fixture(scope="session")
def tiny_zoo(tmp_path_factory) -> TinyZoo:
    return TinyZoo(tmp_path_factory.mktemp("tiny_models"))


def pytest_generate_tests(metafunc):
    if "family" in metafunc.fixturenames:
        metafunc.parametrize("family", sorted(specs()))


@pytest.fixture(scope="session")
def toy_models() -> dict:
    """The shipped toy models (tl_vlm.toy), loaded by name once per session."""
    from tl_vlm import HookedVLM
    from tl_vlm.toy import TOY_MODELS

    return {name: HookedVLM.from_pretrained(name) for name in TOY_MODELS}


@pytest.fixture(scope="session")
def sp_llava(tiny_zoo):
    """The tiny LLaVA with a SentencePiece-style (Vicuna-like) tokenizer."""
    from tests.tiny import make_sentencepiece_tokenizer

    return tiny_zoo.variant("llava", "sentencepiece", tokenizer_factory=make_sentencepiece_tokenizer)


@pytest.fixture(scope="session")
def sp_chameleon_path(tiny_zoo):
    """The tiny Chameleon (it has a gate) with a SentencePiece-style tokenizer that can
    spell ImageNet's class names: the checkpoint's directory."""
    return tiny_zoo.variant_path("chameleon", "sentencepiece", sentencepiece=True)


@pytest.fixture(scope="session", autouse=True)
def _datasets_cache(tmp_path_factory):
    """``load_dataset`` caches what it reads: keep the tests' tiny sets out of the user's
    ``~/.cache/huggingface/datasets``."""
    path = tmp_path_factory.mktemp("hf_datasets_cache")
    patch = pytest.MonkeyPatch()
    patch.setenv("HF_DATASETS_CACHE", str(path))
    if "datasets" in sys.modules:  # imported already: its config read the old value
        patch.setattr(sys.modules["datasets"].config, "HF_DATASETS_CACHE", path)
    yield path
    patch.undo()


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """The paper's evaluation sets in miniature (tests/tinydata): ``tiny_data.path(name)``
    is a directory to pass as ``override`` to ``load_rows``; each is built once."""
    from tests.tinydata import TinyData

    return TinyData(tmp_path_factory.mktemp("tiny_data"))


@pytest.fixture
def no_network(monkeypatch):
    """Every socket connection fails, and the hub libraries believe they are online (so
    an attempt to reach the hub would show up as a refused socket, not be skipped)."""
    import socket

    import datasets
    import huggingface_hub.constants

    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network access in a test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    return attempts     # also the attempts a library swallowed
