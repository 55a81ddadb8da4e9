"""How tl_vlm's adapters reach TransformerLens: one route, written down here.

**The route.** ``tl_vlm_autoload.pth``, installed with the package, runs
:func:`tl_vlm.core.autoload.install` at interpreter start-up: a standard-library-only
hook that calls :func:`register` right after TransformerLens' factory module is imported,
so plain ``TransformerBridge.boot_transformers`` needs no ``import tl_vlm``. Without the
``.pth`` (tl_vlm used from a source tree on ``sys.path``), the first use of
``tl_vlm.HookedVLM`` registers.

**What it adds.** The architectures TransformerLens 4.3 lacks (Chameleon, Janus,
Qwen2-VL) get tl_vlm's adapters in both of TL's tables (the TL 4.3 work-around: TL looks
an architecture up in ``SUPPORTED_ARCHITECTURES`` and in its factory's private copy, and
its ``transformer_lens.architectures`` entry points fill only the copy) and in TL's
multimodal set (else TL would load them with ``AutoModelForCausalLM``).

**What it leaves alone.** Architectures TL supports itself (``LlavaForConditionalGeneration``,
which covers LLaVA and Pixtral, LLaVA-OneVision, Gemma 3, Qwen2.5-VL and Emu3) keep TL's
adapter in plain TransformerLens unless the user asks for tl_vlm's, with
:func:`patch_transformer_lens` or ``TL_VLM_PATCH_TRANSFORMER_LENS=1``. Why one would:
tl_vlm's adapters run text attention through one hooked function (``hook_pattern``
edits are live, unhooked layers run SDPA), and TL 4.3 crashes on Pixtral and needs
torchvision for Qwen2.5-VL. :class:`~tl_vlm.HookedVLM` always boots with tl_vlm's
adapter, for its own call only (:func:`adapter_override`).

**No run-time installs.** TL's processor loader runs ``pip install torchvision`` when an
AutoProcessor fails to load; :func:`forbid_runtime_installs` (run by
:func:`ensure_registered`, before tl_vlm boots anything) turns that into "not
available", so the failure surfaces as a clear error instead.

Example:
    >>> from tl_vlm.core import registration
    >>> sorted(registration.added_architectures())[:3]
    ['AyaVisionForConditionalGeneration', 'ChameleonForConditionalGeneration', 'InternVLForConditionalGeneration']
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
import threading
from typing import Any, Iterator, Optional

from tl_vlm.core.compat import replace_tl_torchvision_installer, tl_adapter_tables
from tl_vlm.core.family import loading, tl_adapter_classes

#: set to 1 to have plain TransformerLens use tl_vlm's adapters for the architectures
#: it supports itself, too (read at start-up by the hook, and by every :func:`register`)
PATCH_ENV = "TL_VLM_PATCH_TRANSFORMER_LENS"
FACTORY_MODULE = "transformer_lens.factories.architecture_adapter_factory"

_lock = threading.RLock()
_native: Optional[frozenset[str]] = None   # TL's own architectures, before tl_vlm's
_patch_requested = False


def _factory() -> Any:
    """TL's factory module (imported here, not at import time: importing it runs the
    start-up hook, which imports this module)."""
    import transformer_lens.factories.architecture_adapter_factory as factory

    return factory


def native_architectures(factory_module: Any = None) -> frozenset[str]:
    """The architectures TransformerLens supports by itself (seen before tl_vlm adds any).

    Example:
        >>> "LlavaForConditionalGeneration" in native_architectures()
        True
        >>> "ChameleonForConditionalGeneration" in native_architectures()
        False
    """
    global _native
    if _native is None:
        table, _ = tl_adapter_tables(factory_module or _factory())
        _native = frozenset(a for a, cls in table.items()
                            if not getattr(cls, "__module__", "").startswith("tl_vlm."))
    return _native


def added_architectures() -> list[str]:
    """The architectures tl_vlm adds to plain TransformerLens (those TL lacks).

    Example:
        >>> "Qwen2VLForConditionalGeneration" in added_architectures()
        True
    """
    return sorted(set(tl_adapter_classes()) - native_architectures())


def _patching() -> bool:
    return _patch_requested or os.environ.get(PATCH_ENV, "") not in ("", "0")


def mark_multimodal(architecture: str) -> None:
    """TL picks the HF auto class from ``MULTIMODAL_ARCHITECTURES`` and falls back to
    ``AutoModelForCausalLM``, which has no entry for tl_vlm's new architectures.

    Example:
        >>> from transformer_lens.utilities import architectures
        >>> "ChameleonForConditionalGeneration" in architectures.MULTIMODAL_ARCHITECTURES
        True
    """
    from transformer_lens.utilities import architectures

    architectures.MULTIMODAL_ARCHITECTURES.add(architecture)


def register(factory_module: Any = None) -> list[str]:
    """Put tl_vlm's adapter classes in TL's tables: for the architectures TL lacks, and
    for the others too when patching was asked for. Idempotent; returns the
    architectures whose entry changed. Deferred (returns []) while the families are
    still being imported: the family package registers when its import ends.

    Example:
        >>> register()
        []
    """
    with _lock:
        if loading():
            return []
        factory_module = factory_module or _factory()
        native = native_architectures(factory_module)
        # Entry points first: once ours are in the table, TL would take its own later
        # discovery of them for an attempted override of a native adapter, and warn.
        factory_module.ArchitectureAdapterFactory.discover_entry_points()
        tables = tl_adapter_tables(factory_module)
        patching = _patching()
        changed = []
        for architecture, adapter in tl_adapter_classes().items():
            if architecture in native and not patching:
                continue
            if any(table.get(architecture) is not adapter for table in tables):
                changed.append(architecture)
            for table in tables:
                table[architecture] = adapter
            mark_multimodal(architecture)
        return changed


def register_if_imported() -> list[str]:
    """:func:`register`, if TransformerLens' factory is imported (else the start-up hook
    registers when it is).

    Example:
        >>> register_if_imported()
        []
    """
    module = sys.modules.get(FACTORY_MODULE)
    return [] if module is None else register(module)


def ensure_registered() -> list[str]:
    """:func:`register` on TL's factory (imported if needed), and no run-time installs
    (:func:`forbid_runtime_installs`); idempotent. tl_vlm calls it before it boots
    anything (not from the start-up hook, which runs inside TL's own import).

    Example:
        >>> ensure_registered()
        []
    """
    forbid_runtime_installs()
    return register(_factory())


def patch_transformer_lens() -> list[str]:
    """Make plain TransformerLens use tl_vlm's adapters for every architecture tl_vlm
    supports, including those TL supports itself; returns the ones that changed.

    Example:
        >>> "LlavaForConditionalGeneration" in patch_transformer_lens()   # doctest: +SKIP
        True
    """
    global _patch_requested
    _patch_requested = True
    return ensure_registered()


@contextlib.contextmanager
def adapter_override(architecture: str, adapter: type) -> Iterator[None]:
    """Within the block, TL selects ``adapter`` for ``architecture`` (one boot of
    HookedVLM) and loads it as a multimodal model; TL's tables are restored after it.
    This is also how the generic path's adapter (:mod:`tl_vlm.core.generic`) reaches TL
    for an architecture no family registers.

    Example:
        >>> from transformer_lens.factories import architecture_adapter_factory as factory
        >>> before = factory.SUPPORTED_ARCHITECTURES["LlavaForConditionalGeneration"]
        >>> with adapter_override("LlavaForConditionalGeneration", object):
        ...     factory.SUPPORTED_ARCHITECTURES["LlavaForConditionalGeneration"]
        <class 'object'>
        >>> factory.SUPPORTED_ARCHITECTURES["LlavaForConditionalGeneration"] is before
        True
    """
    from transformer_lens.utilities import architectures

    tables = tl_adapter_tables(_factory())
    with _lock:
        ensure_registered()
        before = [table.get(architecture) for table in tables]
        # an architecture neither TL nor a family registers (the generic path's) must
        # still load with AutoModelForImageTextToText
        was_multimodal = architecture in architectures.MULTIMODAL_ARCHITECTURES
        for table in tables:
            table[architecture] = adapter
        mark_multimodal(architecture)
        try:
            yield
        finally:
            for table, old in zip(tables, before):
                if old is None:
                    table.pop(architecture, None)
                else:
                    table[architecture] = old
            if not was_multimodal:
                architectures.MULTIMODAL_ARCHITECTURES.discard(architecture)


def _torchvision_importable() -> bool:
    return importlib.util.find_spec("torchvision") is not None


def forbid_runtime_installs() -> None:
    """Replace TL's install-on-failure helper with a plain availability check.

    Example:
        >>> from tl_vlm.core.compat import tl_torchvision_installer
        >>> forbid_runtime_installs(); tl_torchvision_installer() is _torchvision_importable
        True
    """
    replace_tl_torchvision_installer(_torchvision_importable)


from tl_vlm.core import autoload as _autoload  # noqa: E402

_autoload.retry_pending()   # TransformerLens may have been imported while this module was
