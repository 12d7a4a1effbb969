"""Stand-in for comfy/ldm/modules/attention.py (ComfyUI 0.12.3): the attention-function override hook.

`wrap_attn` mirrors 0.12.3: an attention call whose `transformer_options` hold `optimized_attention_override` is handed
to that function (with `_inside_attn_wrapper` set, so a wrapped function called from the override runs directly).
`optimized_attention` is the CPU default of 0.12.3, sub-quadratic attention (here: plain attention, same result).
"""

import functools

import torch

calls = []  # names of the attention functions that ran, for assertions


def wrap_attn(func):
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        remove = False
        try:
            if "_inside_attn_wrapper" not in kwargs:
                options = kwargs.get("transformer_options")
                remove = True
                kwargs["_inside_attn_wrapper"] = True
                if options is not None and "optimized_attention_override" in options:
                    return options["optimized_attention_override"](func, *args, **kwargs)
            return func(*args, **kwargs)
        finally:
            if remove:
                del kwargs["_inside_attn_wrapper"]
    return wrapper


def _heads(t, heads):
    b, n, d = t.shape
    return t.view(b, n, heads, d // heads).transpose(1, 2)


@wrap_attn
def attention_sub_quad(q, k, v, heads, mask=None, **kwargs):
    calls.append("sub_quad")
    q, k, v = (_heads(t, heads) for t in (q, k, v))
    weights = (q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).softmax(-1)
    out = weights @ v
    return out.transpose(1, 2).reshape(out.shape[0], -1, out.shape[1] * out.shape[-1])


@wrap_attn
def attention_pytorch(q, k, v, heads, mask=None, **kwargs):
    calls.append("pytorch")
    q, k, v = (_heads(t, heads) for t in (q, k, v))
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out.transpose(1, 2).reshape(out.shape[0], -1, out.shape[1] * out.shape[-1])


optimized_attention = attention_sub_quad
