"""Every work-around for TransformerLens 4.3 lives here.

1. **Adapter lookup.** TL's ``determine_architecture_from_hf_config`` reads only its
   built-in ``SUPPORTED_ARCHITECTURES`` table, so ``register_adapter`` and the
   ``transformer_lens.architectures`` entry points never reach names TL does not list
   (Chameleon, Janus, Qwen2-VL). :func:`ensure_registered` adds tl_vlm's new
   architectures to both the table and the factory, and to TL's multimodal set (else
   TL loads them with ``AutoModelForCausalLM``) (``tl_vlm._autoload`` does the same
   without an import, through a ``.pth`` start-up hook).
2. **Families TL has, with tl_vlm's adapter.** :func:`adapter_override` makes one boot
   use tl_vlm's adapter (hooked attention, Pixtral tower) without replacing TL's
   default for other callers.
3. **No run-time installs.** TL's processor loader ``pip install``s torchvision when an
   AutoProcessor fails to load; :func:`forbid_runtime_installs` turns that into "not
   available", so the failure surfaces as a clear error instead.
"""

from __future__ import annotations

import contextlib
import importlib.util
import threading
from typing import Iterator

from transformer_lens.factories import architecture_adapter_factory as _factory
from transformer_lens.model_bridge.sources.transformers import helpers as _helpers

from tl_vlm import _autoload

_lock = threading.RLock()


def ensure_registered() -> list[str]:
    """Make TL's lookup and factory know tl_vlm's new architectures; idempotent.

    Returns the architecture names that TL did not know before.
    """
    from tl_vlm.adapters import families

    with _lock:
        # Load entry points first, so TL does not later mistake ours for overrides.
        _factory.ArchitectureAdapterFactory.discover_entry_points()
        _autoload.register(_factory)
        added = []
        for fam in families():
            if fam.tl_has_adapter:
                continue
            for arch in fam.architectures:
                table_entry = _factory.SUPPORTED_ARCHITECTURES.get(arch)
                if table_entry is None or isinstance(table_entry, _autoload.LazyAdapter):
                    _factory.SUPPORTED_ARCHITECTURES[arch] = fam.adapter
                    added.append(arch)
                _factory.ArchitectureAdapterFactory._adapters.setdefault(arch, fam.adapter)
                _autoload.mark_multimodal(arch)
        return added


@contextlib.contextmanager
def adapter_override(architecture: str, adapter: type) -> Iterator[None]:
    """Within the block, TL selects ``adapter`` for ``architecture``."""
    adapters = _factory.ArchitectureAdapterFactory._adapters
    with _lock:
        ensure_registered()
        before_table = _factory.SUPPORTED_ARCHITECTURES.get(architecture)
        before = adapters.get(architecture)
        _factory.SUPPORTED_ARCHITECTURES[architecture] = adapter
        adapters[architecture] = adapter
        try:
            yield
        finally:
            for mapping, old in ((adapters, before),
                                 (_factory.SUPPORTED_ARCHITECTURES, before_table)):
                if old is None:
                    mapping.pop(architecture, None)
                else:
                    mapping[architecture] = old


def _torchvision_importable() -> bool:
    return importlib.util.find_spec("torchvision") is not None


def forbid_runtime_installs() -> None:
    """Replace TL's install-on-failure helper with a plain availability check."""
    _helpers._ensure_torchvision = _torchvision_importable


forbid_runtime_installs()
