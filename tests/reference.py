"""Independent references, computed by hand on the plain Hugging Face model.

``logits_with_pattern_edit`` runs HF's own eager attention and, in each chosen layer,
adds to the attention output the change that an edited pattern makes:
``o_proj((P' - P) @ V)``, with ``P`` the layer's HF pattern and ``V`` its values from the
same pass. Nothing of tl_vlm's attention function is used.
"""

from __future__ import annotations

from typing import Callable

import torch

from tl_vlm.core.attention_bridge import attention_layers


def hf_attention_modules(model, ref) -> dict[int, torch.nn.Module]:
    """For each block of the bridge that has attention (every block but the
    short-convolution ones of a hybrid decoder such as LFM2's), layer -> the same
    attention module inside ``ref``."""
    layers = attention_layers(model)
    kind = type(model.blocks[layers[0]].attn.original_component)
    modules = [m for m in ref.modules() if type(m) is kind]   # the decoder's, in layer order
    assert len(modules) == len(layers), (kind, len(modules), layers)
    return dict(zip(layers, modules))


@torch.no_grad()
def logits_with_pattern_edit(model, ref, inputs: dict, edits: dict[int, Callable]) -> torch.Tensor:
    """HF logits where layer ``l``'s pattern ``P`` is replaced by ``edits[l](P)``."""
    modules = hf_attention_modules(model, ref)
    handles, values = [], {}
    for layer, edit in edits.items():
        attn = modules[layer]

        def grab_v(m, args, out, layer=layer):
            values[layer] = out

        def add_delta(m, args, kwargs, output, layer=layer, edit=edit, attn=attn):
            pattern = output[1]                                     # [b, h, q, k]
            b, h, q, k = pattern.shape
            v = values[layer].view(b, k, -1, attn.head_dim).transpose(1, 2)
            v = v.repeat_interleave(h // v.shape[1], dim=1)
            dz = ((edit(pattern) - pattern) @ v).transpose(1, 2).reshape(b, q, -1)
            o_proj = attn.o_proj if hasattr(attn, "o_proj") else attn.out_proj   # LFM2: out_proj
            delta = torch.nn.functional.linear(dz, o_proj.weight)
            return (output[0] + delta,) + tuple(output[1:])

        # The values attention reads: v_norm's output where the module normalises them
        # (Gemma 4; its k_eq_v layers have no v_proj), else v_proj's.
        source = attn.v_norm if hasattr(attn, "v_norm") else attn.v_proj
        handles.append(source.register_forward_hook(grab_v))
        handles.append(attn.register_forward_hook(add_delta, with_kwargs=True))
    try:
        return ref(**inputs, output_attentions=True).logits
    finally:
        for h in handles:
            h.remove()
