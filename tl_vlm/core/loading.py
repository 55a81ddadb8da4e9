"""Loading a checkpoint: names, placement and processor, checked before any weight is read.

Everything here raises a clear error (what was expected, what was found, what to do)
instead of letting transformers or TransformerLens fail later with a message about
something else (a malformed repo id, a mutually-exclusive argument, a missing file).

Example:
    >>> resolve_model_name("toy-gated").endswith("gated")
    True
    >>> check_placement("cpu", None, None, None, None)
    'cpu'
"""

from __future__ import annotations

import contextlib
import os
import re
from typing import Any, Iterator


class HubUnreachableError(ConnectionError):
    """A hub id was asked for, the hub cannot be reached and the model is not in the local
    Hugging Face cache: said in seconds, instead of minutes of retries.

    Example:
        >>> raise HubUnreachableError("no network")
        Traceback (most recent call last):
        ...
        tl_vlm.core.loading.HubUnreachableError: no network
    """


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub (``HF_ENDPOINT``) answers a TCP connection within
    ``timeout`` seconds; False when offline mode is set.

    Example:
        >>> isinstance(hub_reachable(timeout=0.5), bool)
        True
    """
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "0").upper() in ("1", "ON", "YES", "TRUE"):
        return False
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        with socket.create_connection((endpoint.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def cached_on_this_machine(repo_id: str) -> bool:
    """Whether the local Hugging Face cache holds ``repo_id``'s ``config.json``.

    Example:
        >>> cached_on_this_machine("no-such-org/no-such-model")
        False
    """
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, "config.json")
    except Exception:     # a malformed id: transformers says what is wrong with it
        return False
    return isinstance(found, str)


def check_hub_access(name: str) -> bool:
    """For a hub id: True when it can load only from the local cache (the hub is
    unreachable), False when the hub answers; a one-line :class:`HubUnreachableError`
    when neither, before any retry.

    Example:
        >>> check_hub_access("no-such-org/no-such-model")     # doctest: +SKIP
        Traceback (most recent call last):
        ...
        tl_vlm.core.loading.HubUnreachableError: no-such-org/no-such-model: the Hugging Face hub cannot be reached (no network) and the model is not in the local cache; pass a local directory (save_pretrained output) or a shipped toy model, or connect and retry
    """
    if hub_reachable():
        return False
    if cached_on_this_machine(name):
        return True
    offline = os.environ.get("HF_HUB_OFFLINE", "0").upper() in ("1", "ON", "YES", "TRUE")
    why = "HF_HUB_OFFLINE is set" if offline else "no network"
    raise HubUnreachableError(
        f"{name}: the Hugging Face hub cannot be reached ({why}) and the model is not in "
        f"the local cache; pass a local directory (save_pretrained output) or a shipped toy "
        f"model, or connect and retry")


@contextlib.contextmanager
def offline_if_local(name_or_path: str) -> Iterator[None]:
    """Within the block, the hub is off if ``name_or_path`` is a local directory, or a hub
    id in the local cache while the hub cannot be reached: loading must never wait on
    network time-outs (70 s seen). A hub id neither reachable nor cached is refused at
    once (:func:`check_hub_access`). The environment is restored.

    Example:
        >>> import os, tempfile
        >>> with offline_if_local(tempfile.gettempdir()):
        ...     os.environ["HF_HUB_OFFLINE"]
        '1'
    """
    if not os.path.isdir(name_or_path) and not check_hub_access(name_or_path):
        yield
        return
    import huggingface_hub.constants as hub_constants

    saved_env = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    saved_const = hub_constants.HF_HUB_OFFLINE
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    hub_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        hub_constants.HF_HUB_OFFLINE = saved_const
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def resolve_model_name(name_or_path: str) -> str:
    """A shipped toy model's directory, or ``name_or_path`` itself after sanity checks.

    Catches, before anything is downloaded: a toy name spelled with ``_``, and a local
    path that does not exist (transformers would report it as a malformed repo id).

    Example:
        >>> resolve_model_name("toy-gated").endswith("gated"), resolve_model_name("org/model")
        (True, 'org/model')
        >>> resolve_model_name("toy_gated")
        Traceback (most recent call last):
        ...
        ValueError: no model 'toy_gated': did you mean the shipped toy model 'toy-gated'?
        >>> resolve_model_name("toy-gatd")
        Traceback (most recent call last):
        ...
        ValueError: no model 'toy-gatd': did you mean the shipped toy model 'toy-gated'?
        >>> resolve_model_name("./checkpoints/missing")
        Traceback (most recent call last):
        ...
        FileNotFoundError: no checkpoint directory './checkpoints/missing' (resolved to ...
    """
    from tl_vlm.core.names import TOY_MODELS, is_toy_model, toy_model_path

    if is_toy_model(name_or_path):
        return str(toy_model_path(name_or_path))
    name = str(name_or_path)
    close = [t for t in TOY_MODELS if t.replace("-", "") == name.replace("_", "").replace("-", "")]
    if not close and name.lower().startswith("toy") and "/" not in name:
        import difflib

        close = difflib.get_close_matches(name.lower(), TOY_MODELS, n=1, cutoff=0.75)
    if close and not os.path.exists(name):
        raise ValueError(f"no model {name!r}: did you mean the shipped toy model {close[0]!r}?")
    hub_id = (not name.startswith((".", "/", "~"))            # "org/name", never a path
              and re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name) is not None)
    if not hub_id and not os.path.exists(os.path.expanduser(name)):
        raise FileNotFoundError(
            f"no checkpoint directory {name!r} (resolved to "
            f"{os.path.abspath(os.path.expanduser(name))}); pass an existing directory "
            f"holding config.json and the weights, a hub id such as 'facebook/chameleon-7b', "
            f"or a toy model name {sorted(TOY_MODELS)}")
    return os.path.expanduser(name)


def check_placement(device, device_map, n_devices, max_memory, offload_folder):
    """The single device to pass to TL (None with a map), or a clear error.

    Example:
        >>> check_placement(None, None, None, None, None), check_placement(None, "auto", None, None, None)
        ('cpu', None)
        >>> check_placement("cuda:0", "auto", None, None, None)
        Traceback (most recent call last):
        ...
        ValueError: device='cuda:0' together with device_map: pass either one device ...
    """
    import torch   # here: the CLI imports this module to check names before torch loads

    if device is not None and (device_map is not None or n_devices not in (None, 1)):
        raise ValueError(
            f"device={device!r} together with {'device_map' if device_map is not None else 'n_devices'}: "
            f"pass either one device for the whole model, or a device map / n_devices to "
            f"split it (not both)")
    if device_map is not None and n_devices not in (None, 1):
        raise ValueError("pass device_map or n_devices, not both (n_devices=N means "
                         "device_map='balanced' over cuda:0..N-1)")
    if n_devices is not None and (isinstance(n_devices, bool) or not isinstance(n_devices, int)
                                  or n_devices < 1):
        raise ValueError(f"n_devices must be a positive integer, got {n_devices!r}")
    if n_devices and n_devices > 1:
        available = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if available < n_devices:
            raise ValueError(f"n_devices={n_devices} needs {n_devices} CUDA GPUs; this machine "
                             f"has {available}")
    if (max_memory is not None or offload_folder is not None) and device_map is None \
            and not (n_devices and n_devices > 1):
        raise ValueError("max_memory/offload_folder only apply when the model is split: pass "
                         "device_map='auto' (or a dict) or n_devices")
    if device_map is None and not (n_devices and n_devices > 1):
        device = torch.device(device if device is not None else "cpu")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {str(device)!r} asked for, but CUDA is not available on this "
                             f"machine (torch {torch.__version__}); use device='cpu'")
        if device.type == "cuda" and device.index is not None \
                and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {str(device)!r} asked for, but this machine has "
                             f"{torch.cuda.device_count()} GPU(s)")
        return str(device)
    return None


def load_processor(name_or_path: str, processor: Any, trust_remote_code: bool) -> Any:
    """The checkpoint's processor, or the one given (an object, a hub id or a path).

    Example:
        >>> from tl_vlm.toy import toy_model_path
        >>> type(load_processor(str(toy_model_path("toy-gated")), None, False)).__name__
        'ChameleonProcessor'
    """
    from transformers import AutoProcessor

    if processor is not None and not isinstance(processor, (str, os.PathLike)):
        return processor
    source = str(processor) if processor is not None else name_or_path
    try:
        with offline_if_local(source):
            return AutoProcessor.from_pretrained(source, trust_remote_code=trust_remote_code)
    except Exception as err:  # a VLM without its processor cannot place images
        hint = ("" if processor is not None else
                " If the checkpoint was saved without one, pass the base model's processor: "
                "from_pretrained(path, processor='<hub id or directory of the processor>') "
                "(or a processor object).")
        raise OSError(
            f"could not load the processor from {source!r} ({type(err).__name__}: {err}). "
            f"tl_vlm needs the processor (preprocessor_config.json, tokenizer files) to "
            f"place images in the prompt.{hint}"
        ) from err
