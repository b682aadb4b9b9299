"""Typed configs for every Janus component, the presets, and readers for the two on-disk schemas.

One dataclass per component (Llama decoder, SigLIP encoder, VQ tokenizer, MLP adaptors, image head),
composed into `JanusConfig`. `PRESETS` maps exact names to constructors. `JanusConfig.from_official_dict`
reads the official `config.json` (`model_type: multi_modality`) and `from_hf_dict` the transformers one
(`model_type: janus`). Sizes of the named presets (`siglip_large_patch16_384`, `VQ-16`) follow the official
code (deepseek-ai/Janus, janus/models/{siglip_vit,vq_model}.py).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable


class ConfigError(ValueError):
    """A config that cannot be understood; the message names the file and field."""


@dataclass
class LlamaConfig:
    """Llama-style decoder (DeepSeek-LLM). Field names follow transformers' LlamaConfig."""

    vocab_size: int = 102400
    hidden_size: int = 2048
    intermediate_size: int = 5632
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 4096
    attention_bias: bool = False
    tie_word_embeddings: bool = False

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )


@dataclass
class SigLIPConfig:
    """SigLIP ViT as the official code builds it with timm: no class token, `select_layer` counts from
    the end (-1 = all layers), final LayerNorm applied, the attention-pool head kept but unused."""

    model_name: str = "siglip_large_patch16_384"
    image_size: int = 384
    patch_size: int = 16
    width: int = 1024
    layers: int = 24
    heads: int = 16
    mlp_ratio: float = 4.0
    layer_norm_eps: float = 1e-6
    select_layer: int = -1
    select_feature: str = "same"

    def __post_init__(self):
        if self.image_size % self.patch_size:
            raise ConfigError(f"vision image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.select_feature not in ("same", "patch"):
            raise ConfigError(f"vision select_feature must be 'same' or 'patch', got {self.select_feature!r}")
        if self.width % self.heads:
            raise ConfigError(f"vision width {self.width} is not a multiple of heads {self.heads}")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def depth(self) -> int:
        """Number of transformer blocks actually built (the official code truncates at select_layer)."""
        if self.select_layer <= 0:
            return min(self.layers, self.layers + self.select_layer + 1)
        return min(self.layers, self.select_layer)

    @property
    def num_features(self) -> int:
        return self.num_patches - (1 if self.select_feature == "patch" else 0)


@dataclass
class VQConfig:
    """LlamaGen VQ-16: conv encoder/decoder, l2-normalised codebook."""

    model_name: str = "VQ-16"
    codebook_size: int = 16384
    codebook_embed_dim: int = 8
    codebook_l2_norm: bool = True
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    z_channels: int = 256
    num_res_blocks: int = 2
    in_channels: int = 3
    commit_beta: float = 0.25
    image_size: int = 384
    # GroupNorm groups (VQ-16: 32, i.e. 4 channels a group at ch=128). A narrow VQ keeps that ratio with fewer
    # groups: with one channel a group, GroupNorm normalises every channel on its own and erases colour.
    norm_groups: int = 32

    def __post_init__(self):
        self.ch_mult = tuple(int(m) for m in self.ch_mult)
        if self.norm_groups < 1 or self.ch % self.norm_groups:
            raise ConfigError(f"vq ch={self.ch} must be a multiple of norm_groups={self.norm_groups} (GroupNorm)")
        if self.image_size % self.downsample:
            raise ConfigError(f"vq image_size {self.image_size} is not a multiple of the downsample factor {self.downsample}")

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def grid(self) -> int:
        return self.image_size // self.downsample

    @property
    def num_tokens(self) -> int:
        return self.grid**2


@dataclass
class AlignerConfig:
    """`depth`-layer MLP adaptor with GELU (official `MlpProjector`, projector_type `mlp_gelu`)."""

    input_dim: int
    n_embed: int
    depth: int = 2
    projector_type: str = "mlp_gelu"

    def __post_init__(self):
        if self.projector_type not in ("mlp_gelu", "linear", "identity"):
            raise ConfigError(f"aligner projector_type {self.projector_type!r} is not supported")


@dataclass
class GenHeadConfig:
    """Image head: Linear(n_embed -> image_token_embed), GELU, Linear(-> image_token_size)."""

    n_embed: int
    image_token_embed: int
    image_token_size: int


@dataclass
class JanusConfig:
    llm: LlamaConfig = field(default_factory=LlamaConfig)
    vision: SigLIPConfig = field(default_factory=SigLIPConfig)
    vq: VQConfig = field(default_factory=VQConfig)
    aligner: AlignerConfig | None = None
    gen_aligner: AlignerConfig | None = None
    gen_head: GenHeadConfig | None = None
    num_image_tokens: int | None = None
    name: str = "custom"
    # A januskit extension, off in every released Janus: a learned (num_image_tokens, hidden) table added to the
    # understanding features after the aligner, so that each image token says which patch it is (see
    # `JanusModel.image_features`). The official code and transformers have no such table.
    image_pos_embed: bool = False

    def __post_init__(self):
        d = self.llm.hidden_size
        if self.aligner is None:
            self.aligner = AlignerConfig(input_dim=self.vision.width, n_embed=d)
        if self.gen_aligner is None:
            self.gen_aligner = AlignerConfig(input_dim=self.vq.codebook_embed_dim, n_embed=d)
        if self.gen_head is None:
            self.gen_head = GenHeadConfig(n_embed=d, image_token_embed=d, image_token_size=self.vq.codebook_size)
        if self.num_image_tokens is None:
            self.num_image_tokens = self.vision.num_features
        self.validate()

    def validate(self) -> None:
        d = self.llm.hidden_size
        checks = [
            ("aligner.input_dim", self.aligner.input_dim, "vision.width", self.vision.width),
            ("aligner.n_embed", self.aligner.n_embed, "llm.hidden_size", d),
            ("gen_aligner.input_dim", self.gen_aligner.input_dim, "vq.codebook_embed_dim", self.vq.codebook_embed_dim),
            ("gen_aligner.n_embed", self.gen_aligner.n_embed, "llm.hidden_size", d),
            ("gen_head.n_embed", self.gen_head.n_embed, "llm.hidden_size", d),
            ("gen_head.image_token_size", self.gen_head.image_token_size, "vq.codebook_size", self.vq.codebook_size),
            ("num_image_tokens", self.num_image_tokens, "vision features", self.vision.num_features),
        ]
        for a, va, b, vb in checks:
            if va != vb:
                raise ConfigError(f"inconsistent config: {a}={va} but {b}={vb}")

    @property
    def image_tokens_per_image(self) -> int:
        """Number of VQ codes generated per image."""
        return self.vq.num_tokens

    # ------------------------------------------------------------------ serialisation (januskit's own)
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "JanusConfig":
        def sub(klass, key):
            v = d.get(key)
            return None if v is None else _build(klass, v, key)

        return cls(
            llm=sub(LlamaConfig, "llm"),
            vision=sub(SigLIPConfig, "vision"),
            vq=sub(VQConfig, "vq"),
            aligner=sub(AlignerConfig, "aligner"),
            gen_aligner=sub(AlignerConfig, "gen_aligner"),
            gen_head=sub(GenHeadConfig, "gen_head"),
            num_image_tokens=d.get("num_image_tokens"),
            name=d.get("name", "custom"),
            image_pos_embed=bool(d.get("image_pos_embed", False)),
        )

    # ------------------------------------------------------------------ official schema
    @classmethod
    def from_official_dict(cls, d: dict[str, Any], num_image_tokens: int | None = None) -> "JanusConfig":
        """Read the official `config.json` (model_type `multi_modality`)."""
        for key in ("vision_config", "aligner_config", "gen_vision_config", "gen_aligner_config", "gen_head_config", "language_config"):
            if key not in d:
                raise ConfigError(f"official config is missing '{key}'")
        vp = dict(d["vision_config"].get("params", {}))
        name = vp.get("model_name", "siglip_large_patch16_384")
        vision = SigLIPConfig(**SIGLIP_PRESETS[name]) if name in SIGLIP_PRESETS else None
        explicit = {k: vp[k] for k in ("width", "layers", "heads", "mlp_ratio", "patch_size") if k in vp}
        if vision is None and len(explicit) < 5:
            raise ConfigError(
                f"vision_config.params.model_name {name!r} is not a known preset "
                f"({', '.join(SIGLIP_PRESETS)}) and the sizes width/layers/heads/mlp_ratio/patch_size are not all given"
            )
        vision = dataclasses.replace(vision or SigLIPConfig(), model_name=name, **explicit)
        vision = dataclasses.replace(
            vision,
            image_size=int(vp.get("image_size", vision.image_size)),
            select_layer=int(vp.get("select_layer", -1)),
            select_feature=vp.get("select_feature", "same"),
        )

        gv = d["gen_vision_config"]
        gp = dict(gv.get("params", {}))
        vq_name = gv.get("cls", "VQ-16")
        if vq_name in VQ_PRESETS:
            vq = VQConfig(**VQ_PRESETS[vq_name])
        elif all(k in gp for k in ("ch", "ch_mult", "z_channels")):
            vq = VQConfig(model_name=vq_name)
        else:
            raise ConfigError(
                f"gen_vision_config.cls {vq_name!r} is not a known VQ preset ({', '.join(VQ_PRESETS)}) "
                "and the sizes ch/ch_mult/z_channels are not given"
            )
        vq = dataclasses.replace(
            vq,
            model_name=vq_name,
            ch=int(gp.get("ch", vq.ch)),
            ch_mult=tuple(gp.get("ch_mult", vq.ch_mult)),
            z_channels=int(gp.get("z_channels", vq.z_channels)),
            num_res_blocks=int(gp.get("num_res_blocks", vq.num_res_blocks)),
            codebook_size=int(gp.get("image_token_size", vq.codebook_size)),
            codebook_embed_dim=int(gp.get("n_embed", vq.codebook_embed_dim)),
            norm_groups=int(gp.get("norm_groups", vq.norm_groups)),
            image_size=vision.image_size,
        )

        lang = dict(d["language_config"])
        llm = _build(LlamaConfig, {k: v for k, v in lang.items() if k in _fields(LlamaConfig)}, "language_config")

        def aligner(key):
            p = d[key].get("params", {})
            return AlignerConfig(
                input_dim=int(p["input_dim"]), n_embed=int(p["n_embed"]),
                depth=int(p.get("depth", 2)), projector_type=p.get("projector_type", "mlp_gelu"),
            )

        hp = d["gen_head_config"].get("params", {})
        head = GenHeadConfig(
            n_embed=int(hp["n_embed"]), image_token_embed=int(hp["image_token_embed"]),
            image_token_size=int(hp["image_token_size"]),
        )
        return cls(
            llm=llm, vision=vision, vq=vq, aligner=aligner("aligner_config"), gen_aligner=aligner("gen_aligner_config"),
            gen_head=head, num_image_tokens=num_image_tokens, name=d.get("_name_or_path", "custom") or "custom",
        )

    def to_official_dict(self) -> dict[str, Any]:
        v, q, l = self.vision, self.vq, self.llm
        vision_params = {
            "image_size": v.image_size, "model_name": v.model_name,
            "select_feature": v.select_feature, "select_layer": v.select_layer,
        }
        if v.model_name not in SIGLIP_PRESETS or SigLIPConfig(**SIGLIP_PRESETS[v.model_name]) != dataclasses.replace(
            v, select_layer=-1, select_feature="same"
        ):
            vision_params.update(width=v.width, layers=v.layers, heads=v.heads, mlp_ratio=v.mlp_ratio, patch_size=v.patch_size)
        gen_params = {"image_token_size": q.codebook_size, "n_embed": q.codebook_embed_dim}
        if q.model_name not in VQ_PRESETS or VQConfig(**VQ_PRESETS[q.model_name]) != dataclasses.replace(
            q, image_size=VQConfig().image_size
        ):
            gen_params.update(ch=q.ch, ch_mult=list(q.ch_mult), z_channels=q.z_channels, num_res_blocks=q.num_res_blocks)
            if q.norm_groups != VQConfig.norm_groups:
                gen_params["norm_groups"] = q.norm_groups

        def aligner(a: AlignerConfig, mt: str):
            return {"cls": "MlpProjector", "model_type": mt, "params": {
                "depth": a.depth, "input_dim": a.input_dim, "n_embed": a.n_embed, "projector_type": a.projector_type}}

        return {
            "aligner_config": aligner(self.aligner, "aligner"),
            "architectures": ["MultiModalityCausalLM"],
            "gen_aligner_config": aligner(self.gen_aligner, "gen_aligner"),
            "gen_head_config": {"cls": "vision_head", "model_type": "gen_head", "params": {
                "image_token_embed": self.gen_head.image_token_embed, "image_token_size": self.gen_head.image_token_size,
                "n_embed": self.gen_head.n_embed}},
            "gen_vision_config": {"cls": q.model_name, "model_type": "gen_vision", "params": gen_params},
            "language_config": {
                "hidden_size": l.hidden_size, "intermediate_size": l.intermediate_size,
                "max_position_embeddings": l.max_position_embeddings, "model_type": "llama",
                "num_attention_heads": l.num_attention_heads, "num_hidden_layers": l.num_hidden_layers,
                "num_key_value_heads": l.num_key_value_heads, "head_dim": l.head_dim, "vocab_size": l.vocab_size,
                "rms_norm_eps": l.rms_norm_eps, "rope_theta": l.rope_theta, "torch_dtype": "float32",
            },
            "model_type": "multi_modality",
            "torch_dtype": "float32",
            "vision_config": {"cls": "CLIPVisionTower", "model_type": "vision", "params": vision_params},
            "januskit": {"name": self.name, "num_image_tokens": self.num_image_tokens, "vq_image_size": q.image_size,
                         **({"image_pos_embed": True} if self.image_pos_embed else {})},
        }

    # ------------------------------------------------------------------ transformers schema
    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> "JanusConfig":
        """Read transformers' `JanusConfig` (model_type `janus`)."""
        t = dict(d.get("text_config") or {})
        rope = t.get("rope_parameters") or t.get("rope_scaling") or {}
        if "rope_theta" not in t and isinstance(rope, dict) and "rope_theta" in rope:
            t["rope_theta"] = rope["rope_theta"]  # transformers 5 keeps it under rope_parameters
        v = dict(d.get("vision_config") or {})
        q = dict(d.get("vq_config") or {})
        llm = _build(LlamaConfig, {k: val for k, val in t.items() if k in _fields(LlamaConfig)}, "text_config")
        vision = SigLIPConfig(
            model_name="siglip_large_patch16_384",
            image_size=int(v.get("image_size", 384)), patch_size=int(v.get("patch_size", 16)),
            width=int(v.get("hidden_size", 1024)), layers=int(v.get("num_hidden_layers", 24)),
            heads=int(v.get("num_attention_heads", 16)), mlp_ratio=float(v.get("mlp_ratio", 4.0)),
            layer_norm_eps=float(v.get("layer_norm_eps", 1e-6)),
        )
        if v.get("use_qk_norm") or v.get("hidden_act", "gelu") != "gelu" or not v.get("attention_bias", True):
            raise ConfigError("vision_config: only the Janus SigLIP (no qk-norm, GELU, attention bias) is supported")
        vq = VQConfig(
            model_name="VQ-16",
            codebook_size=int(q.get("num_embeddings", 16384)), codebook_embed_dim=int(q.get("embed_dim", 8)),
            ch=int(q.get("base_channels", 128)), ch_mult=tuple(q.get("channel_multiplier", (1, 1, 2, 2, 4))),
            z_channels=int(q.get("latent_channels", 256)), num_res_blocks=int(q.get("num_res_blocks", 2)),
            image_size=vision.image_size,
        )
        if vq.grid != int(q.get("num_patches", vq.grid)):
            vq = dataclasses.replace(vq, image_size=int(q["num_patches"]) * vq.downsample)
        return cls(
            llm=llm, vision=vision, vq=vq,
            aligner=AlignerConfig(input_dim=vision.width, n_embed=int(v.get("projection_dim", llm.hidden_size)),
                                  depth=int(v.get("depth", 2))),
            gen_aligner=AlignerConfig(input_dim=vq.codebook_embed_dim, n_embed=int(q.get("projection_dim", llm.hidden_size)),
                                      depth=int(q.get("num_hidden_layers", 2))),
            gen_head=GenHeadConfig(n_embed=int(q.get("image_token_embed_dim", llm.hidden_size)),
                                   image_token_embed=int(q.get("projection_dim", llm.hidden_size)),
                                   image_token_size=vq.codebook_size),
            num_image_tokens=int(v.get("num_image_tokens", vision.num_patches)),
        )

    # ------------------------------------------------------------------ files
    @classmethod
    def from_file(cls, path: str | Path) -> "JanusConfig":
        """Read any of the three schemas from a `config.json`; the schema is chosen by `model_type`."""
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConfigError(f"{path}: cannot read config: {e}") from None
        if not isinstance(d, dict):
            raise ConfigError(f"{path}: config must be a JSON object")
        mt = d.get("model_type")
        try:
            if mt == "multi_modality":
                extra = d.get("januskit", {})
                cfg = cls.from_official_dict(d, num_image_tokens=extra.get("num_image_tokens"))
                if "vq_image_size" in extra:
                    cfg.vq = dataclasses.replace(cfg.vq, image_size=int(extra["vq_image_size"]))
                if "name" in extra:
                    cfg.name = extra["name"]
                cfg.image_pos_embed = bool(extra.get("image_pos_embed", False))
                return cfg
            if mt == "janus":
                return cls.from_hf_dict(d)
            if mt == "januskit":
                return cls.from_dict(d["config"])
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"{path}: malformed config ({type(e).__name__}: {e})") from None
        raise ConfigError(
            f"{path}: model_type {mt!r} is not a Janus config (expected 'multi_modality', 'janus' or 'januskit')"
        )


def _fields(klass) -> set[str]:
    return {f.name for f in dataclasses.fields(klass)}


def _build(klass, values: dict[str, Any], where: str):
    unknown = set(values) - _fields(klass)
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {sorted(unknown)} for {klass.__name__}")
    try:
        return klass(**values)
    except TypeError as e:
        raise ConfigError(f"{where}: {e}") from None


# ---------------------------------------------------------------------- presets
SIGLIP_PRESETS: dict[str, dict[str, Any]] = {
    "siglip_large_patch16_384": dict(model_name="siglip_large_patch16_384", image_size=384, patch_size=16,
                                     width=1024, layers=24, heads=16, mlp_ratio=4.0),
    "siglip_so400m_patch14_384": dict(model_name="siglip_so400m_patch14_384", image_size=384, patch_size=14,
                                      width=1152, layers=27, heads=16, mlp_ratio=3.7362),
}

VQ_PRESETS: dict[str, dict[str, Any]] = {
    "VQ-16": dict(model_name="VQ-16", ch=128, ch_mult=(1, 1, 2, 2, 4), z_channels=256),
}


def _janus(name: str, hidden: int, intermediate: int, layers: int, heads: int) -> JanusConfig:
    return JanusConfig(
        llm=LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                        num_attention_heads=heads, max_position_embeddings=4096),
        vision=SigLIPConfig(**SIGLIP_PRESETS["siglip_large_patch16_384"]),
        vq=VQConfig(**VQ_PRESETS["VQ-16"]),
        name=name,
    )


def _tiny(name: str = "tiny", image_size: int = 64) -> JanusConfig:
    """A model small enough for unit tests: 2-layer decoder, 16-px patches, 64x64 images (16 image tokens)."""
    return JanusConfig(
        llm=LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512),
        vision=SigLIPConfig(model_name="siglip_tiny_test", image_size=image_size, patch_size=16, width=32,
                            layers=2, heads=2, mlp_ratio=2.0),
        vq=VQConfig(model_name="VQ-16-tiny-test", codebook_size=64, codebook_embed_dim=8, ch=32,
                    ch_mult=(1, 1, 2, 2, 2), z_channels=32, num_res_blocks=1, image_size=image_size),
        name=name,
    )


def _shapes(vocab_size: int = 1024) -> JanusConfig:
    """The bundled model: 64x64 images of the shapes world; 16-px vision patches and a downsample-16 VQ, so an
    image is 16 understanding features and 16 image tokens (one per grid cell)."""
    return JanusConfig(
        llm=LlamaConfig(vocab_size=vocab_size, hidden_size=256, intermediate_size=704, num_hidden_layers=6,
                        num_attention_heads=4, max_position_embeddings=512),
        vision=SigLIPConfig(model_name="siglip_shapes", image_size=64, patch_size=16, width=128, layers=4, heads=4,
                            mlp_ratio=4.0),
        vq=VQConfig(model_name="VQ-16-shapes", codebook_size=64, codebook_embed_dim=8, ch=32,
                    ch_mult=(1, 1, 2, 2, 4), z_channels=64, num_res_blocks=1, image_size=64, norm_groups=8),
        name="januskit-shapes",
    )


PRESETS: dict[str, Callable[[], JanusConfig]] = {
    "tiny": _tiny,
    "januskit-shapes": _shapes,
    "janus-1.3b": lambda: _janus("janus-1.3b", 2048, 5632, 24, 16),
    "janus-pro-1b": lambda: _janus("janus-pro-1b", 2048, 5632, 24, 16),
    "janus-pro-7b": lambda: _janus("janus-pro-7b", 4096, 11008, 30, 32),
}


def preset(name: str) -> JanusConfig:
    """Config of a named preset; an unknown name is an error listing the known ones."""
    try:
        make = PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}") from None
    return make()
