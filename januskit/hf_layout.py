"""The transformers layout (`JanusForConditionalGeneration`): tensor-name map and config schema.

januskit keeps the official deepseek-ai/Janus names. transformers renames almost everything, splits the SigLIP
fused qkv projection into q/k/v, stores the position embedding as an Embedding table, and has no attention-pool
head or codebook usage counter. The name map is data (RENAMES); the three tensor reshapes are spelled out.
"""

from __future__ import annotations

import re

import torch

from .config import JanusConfig

# Official tensors that transformers does not have (Janus never uses them).
UNUSED_IN_HF = ("vision_model.vision_tower.attn_pool.", "gen_vision_model.quantize.codebook_used")

V, HV = r"vision_model\.vision_tower\.", "model.vision_model."
# (official regex, transformers template), applied in order; the first match wins.
RENAMES: list[tuple[str, str]] = [
    (V + r"patch_embed\.proj\.(\w+)$", HV + r"embeddings.patch_embedding.\1"),
    (V + r"blocks\.(\d+)\.norm1\.(\w+)$", HV + r"encoder.layers.\1.layer_norm1.\2"),
    (V + r"blocks\.(\d+)\.norm2\.(\w+)$", HV + r"encoder.layers.\1.layer_norm2.\2"),
    (V + r"blocks\.(\d+)\.attn\.proj\.(\w+)$", HV + r"encoder.layers.\1.self_attn.projection_layer.\2"),
    (V + r"blocks\.(\d+)\.mlp\.(fc[12])\.(\w+)$", HV + r"encoder.layers.\1.mlp.\2.\3"),
    (V + r"norm\.(\w+)$", HV + r"post_layernorm.\1"),
    (r"gen_vision_model\.(encoder)\.conv_blocks\.(\d+)\.res\.(\d+)\.(.*)$", r"model.vqmodel.\1.down.\2.block.\3.\4"),
    (r"gen_vision_model\.(encoder)\.conv_blocks\.(\d+)\.(.*)$", r"model.vqmodel.\1.down.\2.\3"),
    (r"gen_vision_model\.(decoder)\.conv_blocks\.(\d+)\.res\.(\d+)\.(.*)$", r"model.vqmodel.\1.up.\2.block.\3.\4"),
    (r"gen_vision_model\.(decoder)\.conv_blocks\.(\d+)\.(.*)$", r"model.vqmodel.\1.up.\2.\3"),
    (r"gen_vision_model\.(\w+coder)\.mid\.0\.(.*)$", r"model.vqmodel.\1.mid.block_1.\2"),
    (r"gen_vision_model\.(\w+coder)\.mid\.1\.(.*)$", r"model.vqmodel.\1.mid.attn_1.\2"),
    (r"gen_vision_model\.(\w+coder)\.mid\.2\.(.*)$", r"model.vqmodel.\1.mid.block_2.\2"),
    (r"gen_vision_model\.(.*)$", r"model.vqmodel.\1"),
    (r"gen_head\.output_mlp_projector\.(\w+)$", r"model.generation_head.proj_out.\1"),
    (r"gen_head\.vision_head\.(\w+)$", r"model.generation_head.vision_head.\1"),
    (r"gen_embed\.weight$", r"model.generation_embeddings.weight"),
    (r"language_model\.model\.(.*)$", r"model.language_model.\1"),
    (r"language_model\.lm_head\.weight$", r"lm_head.weight"),
]
# The MLP adaptors: official Sequential index 0 is `fc1`, index 2k is `hidden_layers.{k-1}`.
ALIGNERS = {"aligner": "model.aligner", "gen_aligner": "model.generation_aligner"}


def _aligner_name(name: str) -> str | None:
    m = re.match(r"(gen_aligner|aligner)\.layers\.(\d+)\.(\w+)$", name)
    if not m:
        return None
    base, idx, leaf = ALIGNERS[m.group(1)], int(m.group(2)), m.group(3)
    return f"{base}.fc1.{leaf}" if idx == 0 else f"{base}.hidden_layers.{idx // 2 - 1}.{leaf}"


def official_name_to_hf(name: str) -> str:
    aligned = _aligner_name(name)
    if aligned:
        return aligned
    for pattern, template in RENAMES:
        if re.match(pattern, name):
            return re.sub(pattern, template, name)
    raise ValueError(f"tensor {name!r} has no counterpart in the transformers Janus layout")


def is_hf_layout(sd) -> bool:
    return any(k.startswith(("model.vision_model.", "model.language_model.", "model.vqmodel.", "vqmodel.",
                             "generation_head.")) for k in sd)


def official_to_hf(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for name, t in sd.items():
        if name.startswith(UNUSED_IN_HF):
            continue
        m = re.match(V + r"blocks\.(\d+)\.attn\.qkv\.(\w+)$", name)
        if m:
            for part, chunk in zip("qkv", t.chunk(3, dim=0)):
                out[f"{HV}encoder.layers.{m.group(1)}.self_attn.{part}_proj.{m.group(2)}"] = chunk
        elif name == "vision_model.vision_tower.pos_embed":
            out[HV + "embeddings.position_embedding.weight"] = t[0]
        else:
            out[official_name_to_hf(name)] = t
    return out


def hf_to_official(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of `official_to_hf`; accepts `JanusForConditionalGeneration` or bare `JanusModel` keys."""
    sd = dict(sd)
    if not any(k.startswith("model.") for k in sd):
        sd = {("lm_head.weight" if k == "lm_head.weight" else f"model.{k}"): v for k, v in sd.items()}
    if "lm_head.weight" not in sd and "model.language_model.embed_tokens.weight" in sd:
        sd["lm_head.weight"] = sd["model.language_model.embed_tokens.weight"]  # tied head
    # Invert the rename map by probing each official-shaped name pattern.
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for name, t in sd.items():
        m = re.match(re.escape(HV) + r"encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(\w+)$", name)
        if m:
            qkv.setdefault((m.group(1), m.group(3)), {})[m.group(2)] = t
            continue
        if name == HV + "embeddings.position_embedding.weight":
            out["vision_model.vision_tower.pos_embed"] = t[None]
            continue
        out[_hf_name_to_official(name)] = t
    for (layer, leaf), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise ValueError(f"vision layer {layer}: q/k/v projections incomplete ({sorted(parts)})")
        out[f"vision_model.vision_tower.blocks.{layer}.attn.qkv.{leaf}"] = torch.cat([parts[p] for p in "qkv"])
    return out


_INVERSE: list[tuple[str, str]] = [
    (re.escape(HV) + r"embeddings\.patch_embedding\.(\w+)$", r"vision_model.vision_tower.patch_embed.proj.\1"),
    (re.escape(HV) + r"encoder\.layers\.(\d+)\.layer_norm1\.(\w+)$", r"vision_model.vision_tower.blocks.\1.norm1.\2"),
    (re.escape(HV) + r"encoder\.layers\.(\d+)\.layer_norm2\.(\w+)$", r"vision_model.vision_tower.blocks.\1.norm2.\2"),
    (re.escape(HV) + r"encoder\.layers\.(\d+)\.self_attn\.projection_layer\.(\w+)$",
     r"vision_model.vision_tower.blocks.\1.attn.proj.\2"),
    (re.escape(HV) + r"encoder\.layers\.(\d+)\.mlp\.(fc[12])\.(\w+)$", r"vision_model.vision_tower.blocks.\1.mlp.\2.\3"),
    (re.escape(HV) + r"post_layernorm\.(\w+)$", r"vision_model.vision_tower.norm.\1"),
    (r"model\.aligner\.fc1\.(\w+)$", r"aligner.layers.0.\1"),
    (r"model\.generation_aligner\.fc1\.(\w+)$", r"gen_aligner.layers.0.\1"),
    (r"model\.vqmodel\.(\w+coder)\.mid\.block_1\.(.*)$", r"gen_vision_model.\1.mid.0.\2"),
    (r"model\.vqmodel\.(\w+coder)\.mid\.attn_1\.(.*)$", r"gen_vision_model.\1.mid.1.\2"),
    (r"model\.vqmodel\.(\w+coder)\.mid\.block_2\.(.*)$", r"gen_vision_model.\1.mid.2.\2"),
    (r"model\.vqmodel\.encoder\.down\.(\d+)\.block\.(\d+)\.(.*)$", r"gen_vision_model.encoder.conv_blocks.\1.res.\2.\3"),
    (r"model\.vqmodel\.encoder\.down\.(\d+)\.(.*)$", r"gen_vision_model.encoder.conv_blocks.\1.\2"),
    (r"model\.vqmodel\.decoder\.up\.(\d+)\.block\.(\d+)\.(.*)$", r"gen_vision_model.decoder.conv_blocks.\1.res.\2.\3"),
    (r"model\.vqmodel\.decoder\.up\.(\d+)\.(.*)$", r"gen_vision_model.decoder.conv_blocks.\1.\2"),
    (r"model\.vqmodel\.(.*)$", r"gen_vision_model.\1"),
    (r"model\.generation_head\.proj_out\.(\w+)$", r"gen_head.output_mlp_projector.\1"),
    (r"model\.generation_head\.vision_head\.(\w+)$", r"gen_head.vision_head.\1"),
    (r"model\.generation_embeddings\.weight$", r"gen_embed.weight"),
    (r"model\.language_model\.(.*)$", r"language_model.model.\1"),
    (r"lm_head\.weight$", r"language_model.lm_head.weight"),
]


def _hf_name_to_official(name: str) -> str:
    m = re.match(r"model\.(aligner|generation_aligner)\.hidden_layers\.(\d+)\.(\w+)$", name)
    if m:
        base = "aligner" if m.group(1) == "aligner" else "gen_aligner"
        return f"{base}.layers.{2 * (int(m.group(2)) + 1)}.{m.group(3)}"
    for pattern, template in _INVERSE:
        if re.match(pattern, name):
            return re.sub(pattern, template, name)
    raise ValueError(f"tensor {name!r} is not part of the transformers Janus layout")


def hf_config_dict(cfg: JanusConfig) -> dict:
    """transformers `config.json` for the same architecture (model_type `janus`)."""
    l, v, q = cfg.llm, cfg.vision, cfg.vq
    if cfg.image_pos_embed:
        raise ValueError("the transformers layout has no image position table (this model has image_pos_embed)")
    if cfg.vision.select_feature != "same" or cfg.vision.depth != cfg.vision.layers:
        raise ValueError("the transformers layout supports only select_layer=-1, select_feature='same'")
    if cfg.gen_head.image_token_embed != cfg.gen_aligner.n_embed:
        raise ValueError("the transformers layout needs gen_head.image_token_embed == gen_aligner.n_embed")
    if q.norm_groups != 32:
        raise ValueError(f"the transformers layout has 32 GroupNorm groups in the VQ; this model has {q.norm_groups}")
    return {
        "model_type": "janus",
        "architectures": ["JanusForConditionalGeneration"],
        "tie_word_embeddings": False,
        "text_config": {
            "model_type": "llama", "vocab_size": l.vocab_size, "hidden_size": l.hidden_size,
            "intermediate_size": l.intermediate_size, "num_hidden_layers": l.num_hidden_layers,
            "num_attention_heads": l.num_attention_heads, "num_key_value_heads": l.num_key_value_heads,
            "head_dim": l.head_dim, "rms_norm_eps": l.rms_norm_eps, "rope_theta": l.rope_theta,
            "max_position_embeddings": l.max_position_embeddings, "attention_bias": l.attention_bias,
            "hidden_act": "silu", "tie_word_embeddings": False,
        },
        "vision_config": {
            "model_type": "janus_vision_model", "hidden_size": v.width, "num_hidden_layers": v.layers,
            "num_attention_heads": v.heads, "image_size": v.image_size, "patch_size": v.patch_size,
            "mlp_ratio": v.mlp_ratio, "layer_norm_eps": v.layer_norm_eps, "hidden_act": "gelu",
            "attention_bias": True, "use_qk_norm": False, "projection_dim": cfg.aligner.n_embed,
            "depth": cfg.aligner.depth, "num_image_tokens": cfg.num_image_tokens,
        },
        "vq_config": {
            "model_type": "janus_vqgan", "embed_dim": q.codebook_embed_dim, "num_embeddings": q.codebook_size,
            "latent_channels": q.z_channels, "base_channels": q.ch, "channel_multiplier": list(q.ch_mult),
            "num_res_blocks": q.num_res_blocks, "num_patches": q.grid, "projection_dim": cfg.gen_aligner.n_embed,
            "num_hidden_layers": cfg.gen_aligner.depth, "image_token_embed_dim": cfg.gen_head.n_embed,
            "hidden_act": "gelu", "in_channels": q.in_channels, "out_channels": 3,
        },
    }
