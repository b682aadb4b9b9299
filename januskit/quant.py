"""Weight-only int8 quantization, applied to a plain model from outside.

Decoding is memory-bound: every step reads every weight of the decoder once. Storing the decoder's linear
weights as int8 with one scale per output channel halves the bytes read compared with bfloat16; activations
stay in the model's dtype. A decode step's few bf16 rows on a CPU with AVX-512 BF16 run januskit's own kernel
(`kernels.linear_int8`, which reads the int8 weight at close to the memory bandwidth, or for 3-16 rows on CPUs with
AMX tiles `kernels.linear_amx_int8`, which widens each weight once for all rows); elsewhere on CPU and CUDA
`torch._weight_int8pack_mm`, and a prompt's many rows dequantize the weight for the regular GEMM.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels


class Int8Linear(nn.Module):
    """y = x @ (q * scale).T + b with q int8 (out, in) and scale (out,), symmetric per output channel."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach()
        scale = (w.float().abs().amax(dim=1) / 127.0).clamp(min=1e-12)  # (out,)
        self.register_buffer("qweight", torch.round(w.float() / scale[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale.to(w.dtype))
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])  # (M, in)
        kind, _ = kernels.gemv_plan(x2, self.out_features)
        if kind is not None:  # decode on the CPU kernels
            f = kernels.linear_amx_int8 if kind == "amx" else kernels.linear_int8
            return f(x2, self.qweight, self.scale, self.bias).view(*shape[:-1], self.out_features)
        if x2.shape[0] <= 16 and _packed_mm_ok(x2, self.scale):  # decode: memory-bound, read int8
            y = torch._weight_int8pack_mm(x2, self.qweight, self.scale)
        else:  # prefill: compute-bound, dequantize once and use the regular GEMM
            y = F.linear(x2, self.qweight.to(x.dtype) * self.scale[:, None].to(x.dtype))
        if self.bias is not None:
            y = y + self.bias
        return y.view(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weight-only"


def _packed_mm_ok(x: torch.Tensor, scale: torch.Tensor) -> bool:
    return (hasattr(torch, "_weight_int8pack_mm") and x.dtype == scale.dtype
            and x.dtype in (torch.bfloat16, torch.float16, torch.float32) and x.device.type in ("cpu", "cuda"))


def quantize_int8(model: nn.Module, include: tuple[str, ...] = ("language_model.model.layers", "gen_head")) -> int:
    """Replace the nn.Linear modules under the given prefixes (the per-step decode weights) in place.

    Returns the number of layers replaced. The embedding tables, the vision encoder and the VQ decoder stay as
    they are (they are read once per image, not once per token).
    """
    n = 0
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if isinstance(child, nn.Linear) and full.startswith(include):
                setattr(module, child_name, Int8Linear(child))
                n += 1
    return n
