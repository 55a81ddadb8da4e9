"""Make ``TransformerBridge.boot_transformers`` see tl_vlm's adapters without an import.

TransformerLens 4.3 decides whether it supports a checkpoint by looking its
architecture name up in ``SUPPORTED_ARCHITECTURES`` *before* it reads the
``transformer_lens.architectures`` entry points, so an entry point for a name TL does
not already list is never reached. tl_vlm ships ``tl_vlm_autoload.pth``, which calls
:func:`install` at interpreter start-up: a meta-path hook that, once TL's factory
module has been imported, adds tl_vlm's entry-point names to that table as lazy
entries. The adapters themselves are imported only when a model is booted.

Standard library only: this runs in every interpreter of the environment.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.metadata
import importlib.util
import sys

FACTORY_MODULE = "transformer_lens.factories.architecture_adapter_factory"
ENTRY_POINT_GROUP = "transformer_lens.architectures"


class LazyAdapter:
    """Stands in for an adapter class until TL instantiates it."""

    def __init__(self, target: str) -> None:
        self.target = target

    def load(self) -> type:
        module, _, attr = self.target.partition(":")
        return getattr(importlib.import_module(module), attr)

    def __call__(self, cfg):  # TL calls adapter_class(cfg)
        return self.load()(cfg)

    def __repr__(self) -> str:
        return f"LazyAdapter({self.target!r})"


def mark_multimodal(architecture: str) -> None:
    """TL picks the HF auto class from ``MULTIMODAL_ARCHITECTURES`` and falls back to
    ``AutoModelForCausalLM``, which has no entry for tl_vlm's new architectures."""
    from transformer_lens.utilities import architectures

    architectures.MULTIMODAL_ARCHITECTURES.add(architecture)


def tl_vlm_entry_points() -> dict[str, str]:
    """Architecture name -> "module:Adapter" for tl_vlm's own entry points."""
    return {
        ep.name: ep.value
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
        if ep.value.startswith("tl_vlm.")
    }


def register(factory_module) -> list[str]:
    """Add tl_vlm's architectures to TL's table (names TL already has are left alone)."""
    table = factory_module.SUPPORTED_ARCHITECTURES
    added = []
    for name, target in tl_vlm_entry_points().items():
        if name not in table:
            table[name] = LazyAdapter(target)
            mark_multimodal(name)
            added.append(name)
    return added


class _Finder(importlib.abc.MetaPathFinder):
    """Wraps the loader of TL's factory module so :func:`register` runs right after it."""

    def find_spec(self, fullname, path, target=None):
        if fullname != FACTORY_MODULE:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return spec
        original_exec = spec.loader.exec_module

        def exec_module(module):
            original_exec(module)
            try:
                register(module)
            except Exception:  # never break TL's import over an optional extra
                pass

        spec.loader.exec_module = exec_module
        return spec


def install() -> None:
    """Register now if TL's factory is already imported, else when it is."""
    if FACTORY_MODULE in sys.modules:
        register(sys.modules[FACTORY_MODULE])
    elif not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
