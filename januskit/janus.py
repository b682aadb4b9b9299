"""The composed Janus model (Janus, Janus-Pro; Chen et al. 2025): decoupled visual encoding around one LLM.

Understanding: SigLIP features -> `aligner` -> spliced into the text embeddings at the image placeholders.
Generation: VQ code ids -> `gen_embed` -> `gen_aligner` -> LLM; `gen_head` predicts the next code.
Text keeps the LLM's own embedding table and `lm_head`. Submodule names are the official state-dict names.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import AlignerConfig, GenHeadConfig, JanusConfig
from .kernels import Linear
from .llama import LlamaLM
from .siglip import VisionTower
from .vq import VQModel


class MlpProjector(nn.Module):
    """`depth` Linear layers with GELU between them (official `mlp_gelu`): names `layers.0`, `layers.2`, ..."""

    def __init__(self, cfg: AlignerConfig):
        super().__init__()
        if cfg.projector_type == "identity":
            layers = [nn.Identity()]
        elif cfg.projector_type == "linear":
            layers = [Linear(cfg.input_dim, cfg.n_embed)]
        else:
            layers = [Linear(cfg.input_dim, cfg.n_embed)]
            for _ in range(cfg.depth - 1):
                layers += [nn.GELU(), Linear(cfg.n_embed, cfg.n_embed)]
        self.layers = nn.Sequential(*layers)

    def forward(self, x):
        return self.layers(x)


class GenHead(nn.Module):
    """Image head: hidden (.., n_embed) -> logits over the VQ codebook (.., image_token_size)."""

    def __init__(self, cfg: GenHeadConfig):
        super().__init__()
        self.output_mlp_projector = Linear(cfg.n_embed, cfg.image_token_embed)
        self.vision_head = Linear(cfg.image_token_embed, cfg.image_token_size)

    def forward(self, x):
        return self.vision_head(F.gelu(self.output_mlp_projector(x)))


class JanusModel(nn.Module):
    def __init__(self, cfg: JanusConfig):
        super().__init__()
        self.config = cfg
        self.vision_model = VisionTower(cfg.vision)
        self.aligner = MlpProjector(cfg.aligner)
        self.gen_vision_model = VQModel(cfg.vq)
        self.gen_aligner = MlpProjector(cfg.gen_aligner)
        self.gen_head = GenHead(cfg.gen_head)
        self.gen_embed = nn.Embedding(cfg.vq.codebook_size, cfg.vq.codebook_embed_dim)
        self.language_model = LlamaLM(cfg.llm)
        if cfg.image_pos_embed:
            self.image_pos_embed = nn.Parameter(torch.zeros(cfg.num_image_tokens, cfg.llm.hidden_size))

    @property
    def decoder(self):
        return self.language_model.model

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """Understanding images (N, 3, S, S) -> LLM-space features (N, num_image_tokens, D)."""
        feats = self.aligner(self.vision_model(pixels))
        if self.config.image_pos_embed:
            # Which patch each token is, at the scale of the content (januskit extension, see JanusConfig).
            feats = feats + self.image_pos_embed.to(feats.dtype)
        return feats

    def embed_image_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """VQ code ids (...) -> LLM input embeddings (..., D)."""
        return self.gen_aligner(self.gen_embed(codes))

    def embed(
        self,
        input_ids: torch.Tensor,
        image_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
        gen_codes: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token ids (B, T) -> embeddings (B, T, D) with image inputs written in.

        The positions of `image_mask` are filled, in row-major order, by the features of the images in
        `pixel_values` (N, 3, S, S), N * num_image_tokens positions in all (or by precomputed `image_features`).
        `gen_codes` (B, T) holds VQ codes (-1 elsewhere) whose generation embeddings replace the token ones,
        as when training on images that the model learns to generate.
        """
        embeds = self.decoder.embed_tokens(input_ids)
        if gen_codes is not None:
            is_code = gen_codes >= 0
            if bool(is_code.any()):
                code_embeds = self.embed_image_codes(gen_codes[is_code]).to(embeds.dtype)  # (n_codes, D)
                embeds = embeds.masked_scatter(is_code[..., None], code_embeds)
        if image_mask is None or not bool(image_mask.any()):
            return embeds
        if image_features is None:
            if pixel_values is None:
                raise ValueError("image_mask marks image positions but no pixel_values were given")
            image_features = self.image_features(pixel_values.to(embeds.dtype))
        feats = image_features.reshape(-1, embeds.shape[-1]).to(embeds.dtype)
        n_pos = int(image_mask.sum())
        if feats.shape[0] != n_pos:
            raise ValueError(
                f"{n_pos} image positions in the input ids but {feats.shape[0]} image feature vectors "
                f"({feats.shape[0] // self.config.num_image_tokens} images x {self.config.num_image_tokens})"
            )
        return embeds.masked_scatter(image_mask[..., None], feats)

    def forward(self, input_ids, image_mask=None, pixel_values=None, positions=None, mask=None):
        """Convenience full forward: ids (B, T) -> hidden states (B, T, D). Apply a head to get logits."""
        return self.decoder(self.embed(input_ids, image_mask, pixel_values), positions=positions, mask=mask)
