"""Text and image inputs: tokenizer, the official `deepseek` chat template, image transforms, batching.

Compatible with the official `VLChatProcessor` / `VLMImageProcessor` (deepseek-ai/Janus): the same prompt strings,
the same image-token expansion (`<begin_of_image>` + N x `<image_placeholder>` + `<end_of_image>`), the same
understanding transform (long side to the model size with bicubic resampling, padded to a square with the
background colour, rescaled and normalised). Tokenization uses the `tokenizers` library on `tokenizer.json`.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from tokenizers import Tokenizer


class ProcessorError(ValueError):
    """Bad processor files or bad inputs; the message names the file, token or count."""


DEFAULT_SYSTEM_PROMPT = (
    "You are a helpful language and vision assistant. You are able to understand the visual content that the "
    "user provides, and assist the user with a variety of tasks using natural language."
)
USER, ASSISTANT = "<|User|>", "<|Assistant|>"
ROLE_ALIASES = {"user": USER, "assistant": ASSISTANT, USER: USER, ASSISTANT: ASSISTANT}
SEP, SEP2 = "\n\n", "<｜end▁of▁sentence｜>"

SPECIAL_DEFAULTS = {
    "bos": "<｜begin▁of▁sentence｜>",
    "eos": "<｜end▁of▁sentence｜>",
    "pad": "<｜▁pad▁｜>",
    "image": "<image_placeholder>",
    "boi": "<begin_of_image>",
    "eoi": "<end_of_image>",
}
JANUS_SPECIAL_TOKENS = list(SPECIAL_DEFAULTS.values()) + [USER, ASSISTANT]

PROCESSOR_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "processor_config.json",
                   "preprocessor_config.json")


def load_image(image: Any) -> Image.Image:
    """A path, bytes or PIL image -> RGB PIL image; unreadable or undecodable input names the file."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, (bytes, bytearray)):
        try:
            with Image.open(io.BytesIO(image)) as im:
                return im.convert("RGB")
        except (UnidentifiedImageError, OSError, ValueError) as e:
            raise ProcessorError(f"cannot decode image bytes ({e})") from None
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if not path.exists():
            raise ProcessorError(f"{path}: image file not found")
        try:
            with Image.open(path) as im:
                return im.convert("RGB")
        except (UnidentifiedImageError, OSError, ValueError) as e:
            raise ProcessorError(f"{path}: cannot decode image ({type(e).__name__})") from None
    raise ProcessorError(f"unsupported image input of type {type(image).__name__}")


def _read_json(path: Path, required: bool = True) -> dict:
    if not path.exists():
        if required:
            raise ProcessorError(f"{path}: file not found")
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ProcessorError(f"{path}: cannot read ({e})") from None


def _token_string(value) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value


@dataclass
class Encoded:
    """One conversation, tokenized, with its images."""

    input_ids: torch.Tensor  # (T,) long
    images: torch.Tensor  # (N, 3, S, S) float
    image_mask: torch.Tensor  # (T,) bool, positions that receive image features
    text: str = ""


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T), left-padded
    attention_mask: torch.Tensor  # (B, T) long, 1 = real token
    image_mask: torch.Tensor  # (B, T) bool
    pixel_values: torch.Tensor  # (N, 3, S, S), row 0's images first

    def to(self, device, dtype=None) -> "Batch":
        pv = self.pixel_values.to(device)
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.image_mask.to(device),
                     pv.to(dtype) if dtype is not None else pv)


class JanusProcessor:
    def __init__(self, tokenizer: Tokenizer, num_image_tokens: int = 576, image_size: int = 384,
                 image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5), background_color=(127, 127, 127),
                 rescale_factor: float = 1 / 255, min_size: int = 14, special: dict[str, str] | None = None,
                 add_bos: bool | None = None, files: dict[str, dict] | None = None, system_prompt: str | None = None):
        self.tokenizer = tokenizer
        # The system turn of understanding chats when a conversation has none (processor_config.json's
        # `system_prompt`, as the official VLChatProcessor's); "" means no system turn.
        self.system_prompt = DEFAULT_SYSTEM_PROMPT if system_prompt is None else str(system_prompt)
        self.num_image_tokens = int(num_image_tokens)
        self.image_size = int(image_size)
        self.image_mean = tuple(float(x) for x in image_mean)
        self.image_std = tuple(float(x) for x in image_std)
        self.background_color = tuple(int(x) for x in background_color)
        self.rescale_factor = float(rescale_factor)
        self.min_size = int(min_size)
        self.special = {**SPECIAL_DEFAULTS, **(special or {})}
        ids = {}
        for key, s in self.special.items():
            i = tokenizer.token_to_id(s)
            if i is None:
                raise ProcessorError(f"special token {s!r} ({key}) is not in the tokenizer vocabulary")
            ids[key] = i
        self.bos_id, self.eos_id, self.pad_id = ids["bos"], ids["eos"], ids["pad"]
        self.image_id, self.boi_id, self.eoi_id = ids["image"], ids["boi"], ids["eoi"]
        # Whether tokenizer.json's post-processor already prepends BOS (the released tokenizers do).
        probe = tokenizer.encode("a", add_special_tokens=True).ids
        self._post_adds_bos = bool(probe) and probe[0] == self.bos_id
        self._add_bos = True if add_bos is None else bool(add_bos)
        self._files = files or {}

    # ------------------------------------------------------------------------------------------ files
    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, num_image_tokens: int | None = None,
                        image_size: int | None = None) -> "JanusProcessor":
        """Read the five processor files; `num_image_tokens` / `image_size` override what they say."""
        d = Path(directory)
        tok_path = d / "tokenizer.json"
        if not tok_path.exists():
            raise ProcessorError(f"{tok_path}: file not found")
        try:
            tokenizer = Tokenizer.from_file(str(tok_path))
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise ProcessorError(f"{tok_path}: cannot load tokenizer ({e})") from None
        files = {name: _read_json(d / name, required=name != "special_tokens_map.json") for name in PROCESSOR_FILES[1:]}
        tcfg, smap, pcfg, icfg = (files[n] for n in PROCESSOR_FILES[1:])
        special = {}
        for key in ("bos", "eos", "pad"):
            s = _token_string(smap.get(f"{key}_token")) or _token_string(tcfg.get(f"{key}_token"))
            if s:
                special[key] = s
        if pcfg.get("image_tag"):
            special["image"] = pcfg["image_tag"]
        return cls(
            tokenizer,
            num_image_tokens=num_image_tokens or pcfg.get("num_image_tokens", 576),
            image_size=image_size or icfg.get("image_size", 384),
            image_mean=icfg.get("image_mean", (0.5, 0.5, 0.5)),
            image_std=icfg.get("image_std", (0.5, 0.5, 0.5)),
            background_color=icfg.get("background_color", (127, 127, 127)),
            rescale_factor=icfg.get("rescale_factor", 1 / 255),
            min_size=icfg.get("min_size", 14),
            special=special,
            add_bos=tcfg.get("add_bos_token", True),
            files=files,
            system_prompt=pcfg.get("system_prompt"),
        )

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        from .weights import atomic_write, write_json

        d = Path(directory)
        atomic_write(d / "tokenizer.json", lambda tmp: self.tokenizer.save(tmp))
        tcfg = dict(self._files.get("tokenizer_config.json") or {})
        tcfg.update(bos_token=self.special["bos"], eos_token=self.special["eos"], pad_token=self.special["pad"],
                    add_bos_token=self._add_bos)
        tcfg.setdefault("tokenizer_class", "LlamaTokenizer")
        smap = dict(self._files.get("special_tokens_map.json") or {})
        smap.update(bos_token=self.special["bos"], eos_token=self.special["eos"], pad_token=self.special["pad"])
        smap.setdefault("additional_special_tokens", [self.special["image"], self.special["boi"], self.special["eoi"],
                                                      USER, ASSISTANT])
        pcfg = dict(self._files.get("processor_config.json") or {})
        pcfg.update(image_tag=self.special["image"], num_image_tokens=self.num_image_tokens)
        if self.system_prompt != DEFAULT_SYSTEM_PROMPT or "system_prompt" in pcfg:
            pcfg["system_prompt"] = self.system_prompt
        pcfg.setdefault("sft_format", "deepseek")
        pcfg.setdefault("processor_class", "VLChatProcessor")
        pcfg.setdefault("add_special_token", False)
        pcfg.setdefault("ignore_id", -100)
        pcfg.setdefault("mask_prompt", True)
        icfg = dict(self._files.get("preprocessor_config.json") or {})
        icfg.update(image_size=self.image_size, image_mean=list(self.image_mean), image_std=list(self.image_std),
                    background_color=list(self.background_color), rescale_factor=self.rescale_factor,
                    min_size=self.min_size)
        icfg.setdefault("do_normalize", True)
        icfg.setdefault("image_processor_type", "VLMImageProcessor")
        icfg.setdefault("processor_class", "VLChatProcessor")
        for name, obj in zip(PROCESSOR_FILES[1:], (tcfg, smap, pcfg, icfg)):
            write_json(d / name, obj)

    # ------------------------------------------------------------------------------------------ text
    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        ids = self.tokenizer.encode(text, add_special_tokens=self._post_adds_bos and add_bos).ids
        if add_bos and self._add_bos and not self._post_adds_bos:
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def format_conversation(self, messages: list[dict], system_prompt: str | None = None) -> str:
        """The official `deepseek` SFT template. `system_prompt=None` uses the processor's (`self.system_prompt`)."""
        turns = []
        for i, m in enumerate(messages):
            role = m.get("role") if isinstance(m, dict) else None
            if role == "system":
                system_prompt = str(m.get("content", ""))
                continue
            if role not in ROLE_ALIASES:
                raise ProcessorError(f"message {i}: unknown role {role!r} (use user/assistant/system or "
                                     f"{USER}/{ASSISTANT})")
            turns.append((ROLE_ALIASES[role], str(m.get("content", "")).strip()))
        system = self.system_prompt if system_prompt is None else system_prompt
        out = system + SEP if system else ""
        for i, (role, content) in enumerate(turns):
            out += f"{role}: {content}{(SEP, SEP2)[i % 2]}" if content else f"{role}:"
        return out.strip()

    def format_generation_prompt(self, prompt: str) -> str:
        turns = [{"role": USER, "content": prompt}, {"role": ASSISTANT, "content": ""}]
        return self.format_conversation(turns, system_prompt="") + self.special["boi"]

    def generation_ids(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Conditional prompt ids and the unconditional row: every token but the first and last is pad."""
        cond = torch.tensor(self.encode(self.format_generation_prompt(prompt)), dtype=torch.long)
        uncond = cond.clone()
        uncond[1:-1] = self.pad_id
        return cond, uncond

    # ------------------------------------------------------------------------------------------ images
    def understanding_transform(self, image) -> torch.Tensor:
        """PIL image -> (3, S, S): long side to S (bicubic), padded to a square, rescaled, normalised."""
        img = load_image(image)
        w, h = img.size
        S, longest = self.image_size, max(w, h)
        size_hw = (max(int(h / longest * S), self.min_size), max(int(w / longest * S), self.min_size))
        img = img.resize((size_hw[1], size_hw[0]), Image.BICUBIC)
        w, h = img.size
        if w != h:
            side = max(w, h)
            square = Image.new("RGB", (side, side), self.background_color)
            square.paste(img, ((side - w) // 2, (side - h) // 2))
            img = square
        x = np.asarray(img, dtype=np.float64).transpose(2, 0, 1) * self.rescale_factor
        x = (x - np.array(self.image_mean)[:, None, None]) / np.array(self.image_std)[:, None, None]
        return torch.from_numpy(x.astype(np.float32))

    def generation_transform(self, image, size: int | None = None) -> torch.Tensor:
        """PIL image -> (3, G, G) in [-1, 1]: short side to G (bicubic), centre crop, x / 127.5 - 1."""
        img = load_image(image)
        G = size or self.image_size
        w, h = img.size
        scale = G / min(w, h)
        nw, nh = max(G, round(w * scale)), max(G, round(h * scale))
        img = img.resize((nw, nh), Image.BICUBIC)
        left, top = (nw - G) // 2, (nh - G) // 2
        img = img.crop((left, top, left + G, top + G))
        x = np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / 127.5 - 1.0
        return torch.from_numpy(np.ascontiguousarray(x))

    # ------------------------------------------------------------------------------------------ conversations
    def encode_conversation(self, messages: list[dict], system_prompt: str | None = None) -> Encoded:
        text = self.format_conversation(messages, system_prompt)
        images = [img for m in messages for img in (m.get("images") or [])]
        ids = self.encode(text)
        n_tags = sum(1 for i in ids if i == self.image_id)
        if n_tags != len(images):
            raise ProcessorError(
                f"the conversation has {n_tags} {self.special['image']} placeholder(s) but {len(images)} image(s)"
            )
        out: list[int] = []
        mask: list[bool] = []
        for i in ids:
            if i == self.image_id:
                out += [self.boi_id] + [self.image_id] * self.num_image_tokens + [self.eoi_id]
                mask += [False] + [True] * self.num_image_tokens + [False]
            else:
                out.append(i)
                mask.append(False)
        S = self.image_size
        pixels = torch.stack([self.understanding_transform(im) for im in images]) if images else torch.zeros(0, 3, S, S)
        return Encoded(torch.tensor(out, dtype=torch.long), pixels, torch.tensor(mask, dtype=torch.bool), text)

    def batch(self, encoded: list[Encoded]) -> Batch:
        """Left-pad a list of encoded conversations into one batch."""
        T = max(len(e.input_ids) for e in encoded)
        B = len(encoded)
        ids = torch.full((B, T), self.pad_id, dtype=torch.long)
        attn = torch.zeros((B, T), dtype=torch.long)
        img = torch.zeros((B, T), dtype=torch.bool)
        for b, e in enumerate(encoded):
            n = len(e.input_ids)
            ids[b, T - n:] = e.input_ids
            attn[b, T - n:] = 1
            img[b, T - n:] = e.image_mask
        S = self.image_size
        pixels = [e.images for e in encoded if len(e.images)]
        pv = torch.cat(pixels) if pixels else torch.zeros(0, 3, S, S)
        return Batch(ids, attn, img, pv)
