"""The Llama-style decoder of DeepSeek-LLM: RMSNorm, rotary positions, SDPA attention, SwiGLU MLP.

Module names follow transformers' `LlamaForCausalLM` (`model.embed_tokens`, `model.layers.i.self_attn.q_proj`, ...,
`lm_head`), which is how the official Janus checkpoints store the language model. Numerics follow it too
(RMSNorm in float32, rotate-half RoPE with cos/sin computed in float32).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import LlamaConfig
from . import kernels
from .kernels import Linear


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = kernels.rmsnorm(x, self.weight, self.eps)  # a decode step's few bf16 rows on CPU: one fused pass
        if y is not None:
            return y
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos/sin tables for integer positions (B, T) -> two tensors (B, 1, T, head_dim)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    freqs = positions.float()[..., None] * inv_freq  # (B, T, head_dim/2)
    emb = torch.cat([freqs, freqs], dim=-1)  # (B, T, head_dim)
    return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + _rotate_half(x) * sin


class KVCache:
    """Preallocated keys and values for every layer: (layers, B, n_kv_heads, max_len, head_dim).

    Passed explicitly to the decoder; `length` is the number of positions already written. The decoder
    writes the new positions and advances `length` after its last layer.

    After `make_static()` the cache keeps fixed shapes for a compiled decode step (a CUDA graph on GPUs): a step
    writes at the position held in the tensor `slot` and reads the whole cache, its attention mask hiding what is
    not written yet, and the decoder advances `slot` instead of `length`.
    """

    def __init__(self, cfg: LlamaConfig, batch_size: int, max_len: int, device=None, dtype=torch.float32):
        shape = (cfg.num_hidden_layers, batch_size, cfg.num_key_value_heads, max_len, cfg.head_dim)
        # Uninitialised: every reader gets only the positions written so far (`write` returns [:length + T]),
        # and zero-filling a long prompt's cache cost ~30 ms of a 1B prefill on CPU.
        self.k = torch.empty(shape, device=device, dtype=dtype)
        self.v = torch.empty(shape, device=device, dtype=dtype)
        self.length = 0
        self.slot: torch.Tensor | None = None  # (1,) long once static

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def make_static(self) -> None:
        """From here on, one position a step at `slot` (starting at `length`) over the whole cache (see above)."""
        # Masked keys still enter the products (weight 0): unwritten memory must not hold NaN or inf.
        self.k[:, :, :, self.length:].zero_()
        self.v[:, :, :, self.length:].zero_()
        self.slot = torch.tensor([self.length], device=self.k.device)
        # Tensors a CUDA graph mutates in place must keep their addresses across replays (inputs it mutates that are
        # not marked so make torch.compile skip the graph). No guard on the address: a new cache is a new
        # generation, for which the graph is re-recorded, not recompiled.
        for t in (self.k, self.v, self.slot):
            torch._dynamo.mark_static_address(t, guard=False)

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, n_kv, T, hd) at the current position; return all keys/values so far (static: the whole
        cache)."""
        if self.slot is not None:
            self.k[layer].index_copy_(2, self.slot, k)
            self.v[layer].index_copy_(2, self.slot, v)
            return self.k[layer], self.v[layer]
        end = self.length + k.shape[2]
        self.k[layer, :, :, self.length:end] = k
        self.v[layer, :, :, self.length:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def advance(self, t: int) -> None:
        if self.slot is not None:
            self.slot += t  # in place: part of the compiled step
        else:
            self.length += t

    def reorder(self, index: torch.Tensor) -> None:
        """Keep (and repeat) batch rows by index, e.g. to expand one prompt into n samples."""
        if self.slot is not None:
            raise RuntimeError("KVCache.reorder: a static cache keeps its tensors (reorder before make_static)")
        self.k = self.k[:, index]
        self.v = self.v[:, index]


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_head, self.n_kv, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        d, bias = cfg.hidden_size, cfg.attention_bias
        self.q_proj = Linear(d, self.n_head * self.hd, bias=bias)
        self.k_proj = Linear(d, self.n_kv * self.hd, bias=bias)
        self.v_proj = Linear(d, self.n_kv * self.hd, bias=bias)
        self.o_proj = Linear(self.n_head * self.hd, d, bias=bias)

    def forward(self, x, cos, sin, mask, cache: KVCache | None, last_only: bool = False):
        """x (B, T, D) -> (B, T, D); `last_only`: keys and values of every position (into the cache), the output
        of the last one only, (B, 1, D)."""
        B, T, _ = x.shape
        x = x.reshape(B * T, -1)  # 2-D operands take the fast GEMM paths on CPU (3-D bf16 with T=1 is ~2x slower)
        fast = self.hd in (64, 128) and kernels.fast_path(x)
        if last_only and T > 1:
            return self._last_query(x, B, T, cos, sin, mask, cache, fast)
        if fast and cache is not None and T == 1:
            return self._decode_step(x, cos.view(B, -1), sin.view(B, -1), mask, cache)
        q, k, v = self._project(x, B, T, cos, sin, fast)
        if cache is not None:
            k, v = cache.write(self.layer, k, v)  # (B, n_kv, S, hd)
        # A prompt on the CPU kernels: the prompt attention kernel, GQA inside; it declines masks it does not take.
        y = kernels.prompt_attention(q, k, v, mask, causal=mask is None) if fast else None  # (B, T, n_head, hd)
        if y is None:
            y = self._sdpa(q, k, v, mask).transpose(1, 2)
        return self.o_proj(y.reshape(B * T, self.n_head * self.hd)).view(B, T, -1)

    def _project(self, x, B, T, cos, sin, fused_rope: bool, last_query: bool = False):
        """q (B, n_head, T, hd), k and v (B, n_kv, T, hd) with RoPE applied, as views of the (B*T, heads * hd)
        projections; `fused_rope`: the RoPE kernel over all B * T positions, straight from that layout;
        `last_query`: q of the last position only, (B, n_head, 1, hd)."""
        tq = 1 if last_query else T
        q = self.q_proj(x.view(B, T, -1)[:, -1] if last_query else x)
        k, v = self.k_proj(x), self.v_proj(x)
        qcos, qsin = (cos[:, :, -1:], sin[:, :, -1:]) if last_query else (cos, sin)
        if fused_rope:
            rows = [t.expand(B, 1, T, self.hd).reshape(B * T, self.hd) for t in (cos, sin)]
            qrows = [t.expand(B, 1, 1, self.hd).reshape(B, self.hd) for t in (qcos, qsin)] if last_query else rows
            q = kernels.rope(q.view(B * tq, self.n_head, self.hd), *qrows)
            k = kernels.rope(k.view(B * T, self.n_kv, self.hd), *rows)
        q = q.view(B, tq, self.n_head, self.hd).transpose(1, 2)
        k = k.view(B, T, self.n_kv, self.hd).transpose(1, 2)
        v = v.view(B, T, self.n_kv, self.hd).transpose(1, 2)
        if not fused_rope:
            q, k = apply_rope(q, qcos, qsin), apply_rope(k, cos, sin)
        return q, k, v

    def _last_query(self, x, B, T, cos, sin, mask, cache: KVCache | None, fast: bool):
        """A prompt's last layer when only its last position's output is wanted: k and v over all T positions,
        q, attention, o_proj for the last one (the query of a decode step, over keys written as a prompt's)."""
        q, k, v = self._project(x, B, T, cos, sin, fast, last_query=True)
        if cache is not None:
            k, v = cache.write(self.layer, k, v)
        if mask is not None:
            mask = mask[:, :, -1:]  # (B, 1, 1, S): the last query's row; None stays None (it sees every key)
        y = kernels.decode_attention(q, k, v, mask, self.hd ** -0.5) if fast else None
        if y is None:
            y = self._sdpa(q, k, v, mask)
        return self.o_proj(y.reshape(B, self.n_head * self.hd)).view(B, 1, -1)

    def _sdpa(self, q, k, v, mask):
        """The general attention: SDPA of q (B, n_head, T, hd) over k, v (B, n_kv, S, hd), any mask, device, dtype."""
        T = q.shape[2]
        if self.n_kv != self.n_head:
            rep = self.n_head // self.n_kv
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        if mask is None:
            # Plain causal attention over everything so far: with a cache, the T new queries sit at the end.
            causal = T > 1
            if causal and k.shape[2] != T:
                mask = causal_mask(T, k.shape[2], q.device)
                causal = False
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, attn_mask=mask)
        bf16 = q.dtype == torch.bfloat16 or torch.is_autocast_enabled("cpu")
        if q.requires_grad and q.device.type == "cpu" and bf16:
            # Training in bf16 on the CPU: torch's bf16 flash-attention backward runs at about 60% of the fp32 one's
            # speed (packed 192-token rows: 18.5 against 12.4 ms forward + backward), so attend in fp32 (the bundled
            # model's stage III: ~5% a step less).
            with torch.autocast("cpu", enabled=False):
                return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask).to(q.dtype)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    def _decode_step(self, x, cos, sin, mask, cache: KVCache):
        """One new token per row with the CPU kernels: fused RoPE, attention over the cache, GQA inside."""
        B = x.shape[0]
        q = kernels.rope(self.q_proj(x).view(B, self.n_head, self.hd), cos, sin)
        k = kernels.rope(self.k_proj(x).view(B, self.n_kv, self.hd), cos, sin)
        k, v = cache.write(self.layer, k[:, :, None], self.v_proj(x).view(B, self.n_kv, 1, self.hd))
        y = kernels.decode_attention(q[:, :, None], k, v, mask, self.hd ** -0.5)
        if y is None:  # a mask the kernel does not take: SDPA over the same cache
            y = self._sdpa(q[:, :, None], k, v, mask)
        return self.o_proj(y.reshape(B, self.n_head * self.hd)).view(B, 1, -1)


class MLP(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.gate_proj = Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (B*T, D)
        gate, up = self.gate_proj(x), self.up_proj(x)
        h = kernels.silu_mul(gate, up)  # bf16 inference on CPU: one pass; otherwise None
        return self.down_proj(F.silu(gate) * up if h is None else h).view(shape)


class Block(nn.Module):
    def __init__(self, cfg: LlamaConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, cache, last_only: bool = False):
        h = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, last_only)
        x = (x[:, -1:] if last_only else x) + h
        return x + self.mlp(self.post_attention_layernorm(x))


def causal_mask(t_new: int, t_total: int, device=None) -> torch.Tensor:
    """Bool mask (t_new, t_total): query i (at absolute position t_total - t_new + i) sees keys <= itself."""
    q = torch.arange(t_total - t_new, t_total, device=device)[:, None]
    return torch.arange(t_total, device=device)[None, :] <= q


def padded_mask(attention_mask: torch.Tensor, t_new: int) -> torch.Tensor:
    """Causal mask with key padding, for left-padded batches.

    attention_mask: (B, S) with 1 for real tokens, covering cached and new positions; returns (B, 1, t_new, S).
    A padding query is allowed to see itself so that no softmax row is empty (its output is never used).
    """
    S = attention_mask.shape[1]
    m = causal_mask(t_new, S, attention_mask.device)[None] & attention_mask.bool()[:, None, :]  # (B, t_new, S)
    diag = torch.arange(S - t_new, S, device=attention_mask.device)
    m[:, torch.arange(t_new), diag] = True
    return m[:, None]


def document_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """Causal mask that keeps packed samples apart: doc_ids (B, T) -> (B, 1, T, T)."""
    T = doc_ids.shape[1]
    same = doc_ids[:, :, None] == doc_ids[:, None, :]  # (B, T, T)
    return (same & causal_mask(T, T, doc_ids.device)[None])[:, None]


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """RoPE positions for a left-padded batch (B, S): real tokens count from 0, padding gets 0."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


class LlamaDecoder(nn.Module):
    """Token embedding table plus the transformer stack: embeddings in, final-normed hidden states out."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.gradient_checkpointing = False
        self._compiled: list | None = None  # compiled blocks for training steps (`compile_for_training`)

    def compile_for_training(self) -> None:
        """torch.compile each block (dynamic shapes: packed rows vary in number and length) for the training
        forward only. Inference (eval mode, no autograd, KV caches, the CPU kernels) keeps the eager blocks, and
        the compiled wrappers live outside the module tree, so parameter names and state dicts are unchanged."""
        self._compiled = [torch.compile(block, dynamic=True) for block in self.layers]

    def forward(
        self,
        embeds: torch.Tensor,
        positions: torch.Tensor | None = None,
        cache: KVCache | None = None,
        mask: torch.Tensor | None = None,
        last_only: bool = False,
    ) -> torch.Tensor:
        """embeds (B, T, D) -> hidden (B, T, D).

        positions: (B, T) RoPE positions, default `cache.length + arange(T)`.
        mask: bool attention mask (B, 1, T, S), True = attend, S = cached + new positions; default causal.
        cache: written at `cache.length` and advanced by T (a static cache: at `cache.slot`, T = 1, positions and
        mask given).
        last_only: hidden (B, 1, D) of the last position only, for a prompt whose next token is all that is wanted:
        the last block computes keys and values for every position and the rest (q, attention, o_proj, MLP) for
        the last one (janus-pro-1b, a 755-token understanding prompt: ~3% of the prefill's FLOPs saved).
        """
        B, T, _ = embeds.shape
        if positions is None:
            start = cache.length if cache is not None else 0
            positions = torch.arange(start, start + T, device=embeds.device)[None].expand(B, T)
        cos, sin = rope_cos_sin(positions, self.cfg.head_dim, self.cfg.rope_theta, embeds.dtype)
        x = embeds
        blocks = self.layers
        if self._compiled is not None and self.training and torch.is_grad_enabled() and cache is None:
            blocks = self._compiled
        for i, block in enumerate(blocks):
            last = {"last_only": True} if last_only and i == len(blocks) - 1 else {}
            if self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(block, x, cos, sin, mask, cache, use_reentrant=False, **last)
            else:
                x = block(x, cos, sin, mask, cache, **last)
        if cache is not None:
            cache.advance(T)
        return self.norm(x)


class LlamaLM(nn.Module):
    """Decoder plus text head, named as transformers' LlamaForCausalLM (`model.*`, `lm_head`)."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.cfg = cfg
        self.model = LlamaDecoder(cfg)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
