"""Optional CPU kernels, compiled on first use with the machine's C++ compiler (torch.utils.cpp_extension).

`linear_bf16(x, w, b)`: the decode-step product of 1-16 bfloat16 rows with a bfloat16 weight, reading the weight
once at close to the memory bandwidth (AVX-512 BF16). `available()` says whether it can run here; when it cannot
(no compiler or ninja, another CPU, JANUSKIT_NO_KERNELS=1), callers use F.linear and nothing else changes.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)
_lock = threading.Lock()
_module = None
_failed: str | None = None


def _cpu_flags() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


_CPU_FLAGS = _cpu_flags()  # read once


def _cpu_has_avx512_bf16() -> bool:
    return " avx512_bf16" in _CPU_FLAGS and " avx512bw" in _CPU_FLAGS


# Intel AMX (tile matrix units): oneDNN runs torch's bf16 GEMMs and SDPA's flash attention on them, ~4x what the
# prompt attention kernel below reaches with vdpbf16ps (755-token causal prompt, head dim 128: 4.0 against 15.9 ms a
# layer; 576 patches, head dim 64: 2.0 against 7.8), so on such CPUs prompts keep SDPA (`prompt_attention`).
HAS_AMX = " amx_bf16" in _CPU_FLAGS
PROMPT_ATTENTION_KERNEL = not HAS_AMX


_SOURCES = ("gemv_bf16.cpp", "gemv_amx.cpp", "decode_attention.cpp", "decode_elementwise.cpp", "prefill_attention.cpp")
_HEADERS = ("vec_math.h", "gemv_args.h")
_FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-fopenmp"]


def _build():
    """Compile (or load the cached build of) the kernels. The build is keyed by the sources' contents and copies
    them into its own directory, so every checkout or install with the same sources shares one build, and one with
    other sources gets another (a build keyed by name alone was rebuilt each time another checkout loaded it)."""
    import hashlib

    from torch.utils.cpp_extension import _get_build_directory, load

    here = Path(__file__).parent
    texts = {n: (here / n).read_bytes() for n in _SOURCES + _HEADERS}
    digest = hashlib.sha1(b"".join(texts.values()) + " ".join(_FLAGS).encode()).hexdigest()[:12]
    name = f"januskit_cpu_kernels_{digest}"
    build = Path(_get_build_directory(name, False))
    src = build / "src"
    src.mkdir(parents=True, exist_ok=True)
    for n, text in texts.items():
        dst = src / n
        if not dst.exists() or dst.read_bytes() != text:
            tmp = src / f".{n}.{os.getpid()}.tmp"
            tmp.write_bytes(text)
            os.replace(tmp, dst)
    if not (build / f"{name}.so").exists():
        log.warning("januskit: building the CPU decode kernels (first use on this machine, about a minute; "
                    "JANUSKIT_NO_KERNELS=1 skips them)")
    return load(name=name, sources=[str(src / n) for n in _SOURCES], build_directory=str(build),
                extra_cflags=_FLAGS, extra_ldflags=["-fopenmp"], verbose=False)


def _load():
    global _module, _failed
    if _module is not None or _failed is not None:  # already decided: no need for the lock
        return _module
    with _lock:
        if _module is not None or _failed is not None:
            return _module
        if os.environ.get("JANUSKIT_NO_KERNELS"):
            _failed = "JANUSKIT_NO_KERNELS is set"
        elif not _cpu_has_avx512_bf16():
            _failed = "this CPU has no AVX-512 BF16"
        else:
            try:
                _module = _build()
            except Exception as e:  # no compiler, no ninja, a failed build: fall back, say why once
                _failed = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        if _failed:
            log.info("januskit kernels unavailable (%s); using F.linear", _failed)
        return _module


def available() -> bool:
    """Whether the bf16 decode kernel runs on this machine (compiles it on the first call)."""
    return _load() is not None


def unavailable_reason() -> str | None:
    _load()
    return _failed


def _require():
    """The built kernels, or a RuntimeError saying why there are none."""
    mod = _load()
    if mod is None:
        raise RuntimeError(f"januskit kernels unavailable: {_failed}")
    return mod


def linear_bf16(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """x (M <= 16, K) bf16 @ w (N, K).T bf16 (+ b) -> (M, N) bf16, fp32 accumulation; K a multiple of 32."""
    return _require().linear_bf16(x, w, b, _block_rows(x.shape[0]))


def linear_amx(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """x (M <= 16, K) bf16 @ w (N, K).T bf16 (+ b) -> (M, N) bf16 on AMX tiles; K % 32 == 0, N % 16 == 0."""
    return _require().linear_amx(x, w, b)


def linear_amx_int8(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, b: torch.Tensor | None = None
                    ) -> torch.Tensor:
    """(x (M <= 16, K) bf16 @ q (N, K).T int8) * scale (N,) (+ b) -> (M, N) bf16 on AMX tiles; K % 32, N % 16 == 0."""
    return _require().linear_amx_int8(x, q, scale, b)


_amx_ok: bool | None = None


def amx_gemv() -> bool:
    """Whether `linear_amx` runs here: an AMX CPU, the kernels built, and the tile state granted by the OS."""
    global _amx_ok
    if _amx_ok is None:
        _amx_ok = HAS_AMX and _load() is not None and bool(_module.amx_available())
    return _amx_ok


def linear_int8(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """(x (M <= 16, K) bf16 @ q (N, K).T int8) * scale (N,) (+ b) -> (M, N) bf16, fp32 accumulation; K % 32 == 0."""
    return _require().linear_int8(x, q, scale, b, _block_rows(x.shape[0]))


def read_sum(a: torch.Tensor, prefetch: bool = True) -> float:
    """Sum of a contiguous float32 tensor (numel a multiple of 64), streamed with or without software prefetch: the
    benchmark's memory-read probes."""
    return _require().read_sum(a, prefetch)


def fast_path(x: torch.Tensor) -> bool:
    """Whether a decode-step tensor can take the kernels: bf16 on the CPU, no autograd, kernels built, and not
    inside torch.compile (the kernels are opaque to it: a compiled step runs torch's own ops)."""
    return (not torch.compiler.is_compiling() and x.device.type == "cpu" and x.dtype == torch.bfloat16
            and not (torch.is_grad_enabled() and x.requires_grad) and _load() is not None)


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
    """llama.RMSNorm of bf16 rows in one pass, or None where it does not apply."""
    D = x.shape[-1]
    if (D % 16 or weight.dtype != torch.bfloat16 or not fast_path(x)
            or (torch.is_grad_enabled() and weight.requires_grad)):
        return None
    return _module.rmsnorm_bf16(x, weight, eps)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """llama.apply_rope for one position per row: x (N, H, hd), cos/sin (N, hd) (a prompt's B * T positions are N
    rows); the caller checked fast_path and hd in (64, 128)."""
    return _module.rope_bf16(x, cos, sin)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor | None:
    """F.silu(gate) * up for bf16 tensors of the same shape in one pass, or None where it does not apply."""
    if gate.shape != up.shape or up.dtype != torch.bfloat16 or gate.numel() % 16 or not fast_path(gate):
        return None
    return _module.silu_mul_bf16(gate, up)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                     scale: float) -> torch.Tensor | None:
    """Attention of one new query per row over a KV cache with `decode_attention`, or None where it does not apply
    (then the caller runs SDPA). q (B, H, 1, hd); k, v (B, Hkv, S, hd) (cache views, key vectors contiguous); mask
    None or a boolean (B, 1, 1, S) "may attend". Returns (B, H, 1, hd)."""
    B, H, T, hd = q.shape
    if (T != 1 or hd not in (64, 128) or not (k.dtype == v.dtype == torch.bfloat16) or k.stride(-1) != 1
            or v.stride(-1) != 1 or not fast_path(q)):
        return None
    valid = None
    if mask is not None:
        if mask.dtype != torch.bool or mask.shape != (B, 1, 1, k.shape[2]):
            return None
        valid = mask.view(B, -1)
    return _module.decode_attention(q.view(B, H, hd), k, v, valid, scale).view(B, H, 1, hd)


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
                      causal: bool = False, scale: float | None = None) -> torch.Tensor | None:
    """Attention of T queries over S >= T keys with `prefill_attention`, or None where it does not apply (then the
    caller runs SDPA). q (B, H, T, hd), k / v (B, Hkv, S, hd) with contiguous head vectors (views of (B, T, H, hd)
    projections are fine); mask None or boolean "may attend", broadcastable to (B, 1, T, S); causal: query i sees
    keys j <= i + S - T. Returns (B, T, H, hd), contiguous: the layout the output projection wants."""
    B, H, T, hd = q.shape
    S = k.shape[2]
    if (hd not in (64, 128) or not (q.dtype == k.dtype == v.dtype == torch.bfloat16) or S < T
            or q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1 or q.stride(2) % 2 or k.stride(2) % 2
            or (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad))
            or not fast_path(q)):
        return None
    if mask is not None:
        if mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[0] not in (1, B):
            return None
        mask = mask.expand(mask.shape[0], 1, T, S)[:, 0]
    return _module.prefill_attention(q, k, v, mask, causal, hd ** -0.5 if scale is None else scale)


def prompt_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
                     causal: bool = False) -> torch.Tensor | None:
    """`prefill_attention` where it beats SDPA on this CPU (`PROMPT_ATTENTION_KERNEL`: not on AMX CPUs), else None."""
    return prefill_attention(q, k, v, mask, causal=causal) if PROMPT_ATTENTION_KERNEL else None


# Rows per call up to which the kernel beats F.linear here (2-core EPYC, weights out of cache, GB/s of weight read:
# 1-2 rows 47-51 against 28-32, 6 rows 40 against 25, 8 rows 37 against 22, 10 rows 30 against 22, 16 rows 15
# against 19), and the weight rows a block that read fastest for each row count (1 to 6 rows: one weight row at a
# time; 7-9: three; 10-14: two).
MAX_ROWS = 14


# On AMX CPUs, rows from which the tile kernel (`linear_amx`, up to 16) beats the vdpbf16ps one (2-core Xeon,
# 2 threads, cold weights, GB/s of weight read: 2 rows 26.6 against 26.1, 3 rows 28.9 against 23.6 (5632 columns),
# 4 rows 26.7 against 21.5, 8 rows 26.5 against 21.9, 16 rows 25.3 against 10.7).
AMX_MIN_ROWS = 3
AMX_MAX_ROWS = 16


def gemv_rows(x: torch.Tensor, max_rows: int = MAX_ROWS) -> int:
    """The rows of x (..., K) when its product with a weight can run on the GEMV kernels (a decode step: 1 to
    max_rows bf16 CPU rows without autograd, K a multiple of 32), else 0."""
    K = x.shape[-1]
    rows = x.numel() // K if K else 0
    return rows if K % 32 == 0 and 0 < rows <= max_rows and fast_path(x) else 0


def gemv_plan(x: torch.Tensor, out_features: int) -> tuple[str | None, int]:
    """Which GEMV kernel the product of x (..., K) with an (out_features, K) weight takes, and x's rows: "amx" for
    3-16 rows on AMX CPUs (out_features a multiple of 16), "vdp" (the vdpbf16ps kernels) for 1-MAX_ROWS rows, or
    None (F.linear and friends)."""
    amx = HAS_AMX and out_features % 16 == 0
    rows = gemv_rows(x, AMX_MAX_ROWS if amx else MAX_ROWS)
    if rows >= AMX_MIN_ROWS and amx and amx_gemv():
        return "amx", rows
    return ("vdp", rows) if 0 < rows <= MAX_ROWS else (None, 0)


def _block_rows(rows: int) -> int:
    return 1 if rows <= 6 else (3 if rows <= 9 else 2)


class Linear(nn.Linear):
    """nn.Linear (same parameters, same state dict) whose inference forward on a few bfloat16 rows on a CPU with
    AVX-512 BF16 runs the GEMV kernels: `linear_amx` for 3-16 rows on AMX CPUs (output features a multiple of 16),
    else `linear_bf16` for 1-14 rows; everything else (training, prefill, other dtypes and devices) is F.linear."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if w.dtype == torch.bfloat16 and not (torch.is_grad_enabled() and w.requires_grad):
            kind, rows = gemv_plan(x, self.out_features)
            if kind is not None:
                x2 = x.reshape(rows, x.shape[-1])
                y = (_module.linear_amx(x2, w, self.bias) if kind == "amx"
                     else _module.linear_bf16(x2, w, self.bias, _block_rows(rows)))
                return y.view(*x.shape[:-1], self.out_features)
        return F.linear(x, w, self.bias)
