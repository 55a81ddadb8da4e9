"""Devices and dtypes: where a module runs, its weights as they run, dtype names.

A model split with ``device_map`` (several GPUs, or accelerate's CPU/disk offload) has
modules whose parameters are not where they compute: an offloaded layer's weights are
``meta`` placeholders until accelerate's pre-forward hook loads them onto the layer's
*execution device*. So tl_vlm never asks a parameter where a module runs
(:func:`execution_device`), and reads raw weights only inside :func:`weights_of`.

Example:
    >>> import torch
    >>> layer = torch.nn.Linear(2, 3)
    >>> execution_device(layer), resolve_dtype("bf16")
    (device(type='cpu'), torch.bfloat16)
    >>> with weights_of(layer):
    ...     layer.weight.shape
    torch.Size([3, 2])
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional, Union

import torch

_DTYPE_NAMES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


def resolve_dtype(dtype: Union[str, torch.dtype]) -> torch.dtype:
    """A torch floating dtype from a dtype or its usual name ("bf16", "float32", ...).

    Example:
        >>> resolve_dtype(torch.float16), resolve_dtype("float32")
        (torch.float16, torch.float32)
        >>> resolve_dtype("int8")
        Traceback (most recent call last):
        ...
        ValueError: dtype 'int8' is not supported: expected a torch floating dtype or one of ...
    """
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return dtype
    if isinstance(dtype, str) and dtype.lower().removeprefix("torch.") in _DTYPE_NAMES:
        return _DTYPE_NAMES[dtype.lower().removeprefix("torch.")]
    raise ValueError(
        f"dtype {dtype!r} is not supported: expected a torch floating dtype or one of "
        f"{sorted(_DTYPE_NAMES)} (e.g. dtype='bfloat16' for a 7B model on a GPU)"
    )


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"`` (for run settings and reports)."""
    return str(dtype).removeprefix("torch.")


def execution_device(module: torch.nn.Module) -> Optional[torch.device]:
    """The device ``module`` computes on.

    accelerate's hook says so for dispatched/offloaded modules (their parameters may be
    ``meta``); otherwise the first parameter or buffer that is not ``meta``. None when
    the module holds no tensors at all.
    """
    hook = getattr(module, "_hf_hook", None)
    device = getattr(hook, "execution_device", None)
    if device is not None:
        return torch.device(device) if not isinstance(device, int) else torch.device("cuda", device)
    for tensor in _tensors(module):
        if tensor.device.type != "meta":
            return tensor.device
    return None


def _tensors(module: torch.nn.Module) -> Iterator[torch.Tensor]:
    yield from module.parameters()
    yield from module.buffers()


@contextlib.contextmanager
def weights_of(module: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Within the block, ``module``'s parameters hold real data on its execution device.

    For an offloaded module accelerate loads the weights for the duration (and drops them
    after); for an ordinary module this does nothing. Read raw weights (``o_proj.weight``,
    ``lm_head.weight``, a norm's gain) only inside it.
    """
    hook = getattr(module, "_hf_hook", None)
    if hook is None or not getattr(hook, "offload", False):
        yield module
        return
    from accelerate.utils import align_module_device

    with align_module_device(module, execution_device(module)):
        yield module
