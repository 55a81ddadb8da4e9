"""Make plain ``TransformerBridge.boot_transformers`` use tl_vlm's adapters, no import needed.

TransformerLens 4.3 picks an adapter by looking the checkpoint's architecture name up in
its table (``SUPPORTED_ARCHITECTURES`` and the factory's copy of it). For the
architectures tl_vlm supports, that table should hold tl_vlm's adapters: they add the
architectures TL lacks (Chameleon, Janus, Qwen2-VL), route text attention through the
hooked function (so ``hook_pattern`` edits are live), fix TL 4.3's Pixtral crash and load
Qwen2.5-VL without torchvision. tl_vlm ships ``tl_vlm_autoload.pth``, which calls
:func:`install` at interpreter start-up: a meta-path hook that, right after TL's factory
module has been imported, puts tl_vlm's adapter classes (real classes, imported then)
into that table.

This module imports only the standard library at start-up: it runs in every interpreter
of the environment. tl_vlm itself is imported only when TransformerLens is.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

FACTORY_MODULE = "transformer_lens.factories.architecture_adapter_factory"


def mark_multimodal(architecture: str) -> None:
    """TL picks the HF auto class from ``MULTIMODAL_ARCHITECTURES`` and falls back to
    ``AutoModelForCausalLM``, which has no entry for tl_vlm's new architectures."""
    from transformer_lens.utilities import architectures

    architectures.MULTIMODAL_ARCHITECTURES.add(architecture)


def register(factory_module) -> list[str]:
    """Put tl_vlm's adapter class in TL's table for every architecture tl_vlm supports.

    Returns the architecture names whose entry changed. Idempotent. Does nothing while
    ``tl_vlm.adapters`` is itself being imported (its import of TransformerLens is what
    called here); it registers when its families are loaded.
    """
    adapters = sys.modules.get("tl_vlm.adapters")
    if adapters is not None and not (hasattr(adapters, "_ready") and adapters._ready()):
        return []
    from tl_vlm.adapters import tl_adapter_classes

    from tl_vlm.core.compat import tl_adapter_tables

    # Entry points first: once ours are in the table, TL would take its own later
    # discovery of them for an attempted override of a native adapter, and warn.
    factory_module.ArchitectureAdapterFactory.discover_entry_points()
    tables = tl_adapter_tables(factory_module)
    changed = []
    for architecture, adapter in tl_adapter_classes().items():
        if any(table.get(architecture) is not adapter for table in tables):
            changed.append(architecture)
        for table in tables:
            table[architecture] = adapter
        mark_multimodal(architecture)
    return changed


def register_if_imported() -> list[str]:
    """:func:`register`, if TransformerLens' factory is imported (else the hook will)."""
    module = sys.modules.get(FACTORY_MODULE)
    return [] if module is None else register(module)


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
            except Exception as err:  # never break TL's import over tl_vlm; say so instead
                warnings.warn(f"tl_vlm could not register its adapters with TransformerLens "
                              f"({type(err).__name__}: {err}); `import tl_vlm` to see the error")

        spec.loader.exec_module = exec_module
        return spec


def install() -> None:
    """Register now if TL's factory is already imported, else when it is."""
    if FACTORY_MODULE in sys.modules:
        register(sys.modules[FACTORY_MODULE])
    elif not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
