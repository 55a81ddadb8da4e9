"""Shared fixtures: tiny models built once per session, loaded through the public API."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

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

    def reference(self, name: str):
        """The plain HF model, eager attention, as numerical reference."""
        spec = self.specs[name]
        import transformers

        return getattr(transformers, spec.hf_class).from_pretrained(str(self.path(name)),
                                               attn_implementation="eager").eval()


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
