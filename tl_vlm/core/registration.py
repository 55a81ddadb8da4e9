"""Every work-around for TransformerLens 4.3 lives here.

1. **Adapter lookup.** TL's ``determine_architecture_from_hf_config`` reads only its
   built-in ``SUPPORTED_ARCHITECTURES`` table, so ``register_adapter`` and the
   ``transformer_lens.architectures`` entry points never reach names TL does not list
   (Chameleon, Janus, Qwen2-VL). :func:`ensure_registered` puts tl_vlm's adapters in the
   table and the factory for every architecture tl_vlm supports, and adds the new ones
   to TL's multimodal set (else TL loads them with ``AutoModelForCausalLM``);
   ``tl_vlm._autoload`` does the same without an import, through a ``.pth`` start-up hook.
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

from tl_vlm import _autoload
from tl_vlm.core.compat import replace_tl_torchvision_installer, tl_adapter_tables

_lock = threading.RLock()


def ensure_registered() -> list[str]:
    """Make TL's table and factory hold tl_vlm's adapters; idempotent.

    Returns the architecture names whose entry changed.
    """
    with _lock:
        return _autoload.register(_factory)


@contextlib.contextmanager
def adapter_override(architecture: str, adapter: type) -> Iterator[None]:
    """Within the block, TL selects ``adapter`` for ``architecture``."""
    tables = tl_adapter_tables(_factory)
    with _lock:
        ensure_registered()
        before = [table.get(architecture) for table in tables]
        for table in tables:
            table[architecture] = adapter
        try:
            yield
        finally:
            for table, old in zip(tables, before):
                if old is None:
                    table.pop(architecture, None)
                else:
                    table[architecture] = old


def _torchvision_importable() -> bool:
    return importlib.util.find_spec("torchvision") is not None


def forbid_runtime_installs() -> None:
    """Replace TL's install-on-failure helper with a plain availability check."""
    replace_tl_torchvision_installer(_torchvision_importable)


forbid_runtime_installs()
