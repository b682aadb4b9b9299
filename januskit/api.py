"""The public entry point: `Janus` = model + processor, with chat (understanding) and image generation.

    janus = Janus.from_pretrained(path, device="cpu", dtype=torch.float32)
    janus.chat("What is in the image?", images=["cat.png"]).text
    janus.generate_images("a red circle", n=4, seed=0).images
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Iterator

import torch

from . import hf_layout, weights
from .config import ConfigError, JanusConfig
from .generate import compile_unavailable, generate_image_tokens, generate_text
from .janus import JanusModel
from .processor import JanusProcessor, ProcessorError
from .vq import to_pil


class JanusError(ValueError):
    """A user error (bad input or bad files) with a message that says what is wrong."""


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def default_model_dir() -> Path:
    """The bundled model shipped inside the package."""
    return Path(__file__).resolve().parent / "assets" / "default-model"


def resolve_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[str(dtype)]
    except KeyError:
        raise JanusError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}") from None


def resolve_device(device) -> torch.device:
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise JanusError("device 'cuda' requested but CUDA is not available")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise JanusError("device 'mps' requested but MPS is not available")
    return device


def resolve_model_path(path: str | os.PathLike | None) -> Path:
    """A local directory, or a hub id downloaded with huggingface_hub where the network allows it."""
    if path is None:
        d = default_model_dir()
        if not (d / "config.json").exists():
            raise JanusError(f"the bundled default model is not installed ({d} has no config.json)")
        return d
    p = Path(path).expanduser()
    if p.is_dir():
        return p
    if p.exists():
        raise JanusError(f"{p}: expected a checkpoint directory, found a file")
    s = str(path)
    looks_like_hub_id = s.count("/") == 1 and not s.startswith((".", "/", "~")) and all(s.split("/"))
    if not looks_like_hub_id:
        raise JanusError(f"{p}: no such model directory")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise JanusError(
            f"{s!r} is not a local directory; to download it from the Hugging Face hub install huggingface_hub "
            "(pip install 'januskit[hub]'), or pass the path of a downloaded checkpoint"
        ) from None
    try:
        return Path(snapshot_download(s, allow_patterns=["*.json", "*.safetensors", "*.bin", "*.model", "*.txt"]))
    except Exception as e:  # network errors, unknown repo ids, gated repos
        raise JanusError(f"could not download {s!r} from the hub ({type(e).__name__}: {e}); "
                         "pass the path of a local checkpoint directory instead") from None


@dataclass(frozen=True)
class GenerationDefaults:
    """A checkpoint's own image-decoding defaults, read from `generation.json` beside its config (optional).

    The released Janus checkpoints have none and decode as the official code does (w = 5, every token kept);
    the bundled model ships a cutoff (see `sampling.cfg_merge`) chosen with `januskit eval`.
    """

    cfg_weight: float = 5.0
    cfg_cutoff: float = 0.0

    FILE = "generation.json"

    def __post_init__(self):
        if self.cfg_weight < 0 or not 0 <= self.cfg_cutoff < 1:
            raise JanusError(f"need cfg_weight >= 0 and 0 <= cfg_cutoff < 1, got {self.cfg_weight} and "
                             f"{self.cfg_cutoff}")

    def override(self, cfg_weight: float | None = None, cfg_cutoff: float | None = None) -> "GenerationDefaults":
        """These defaults with the given values (None: keep), checked."""
        given = {"cfg_weight": cfg_weight, "cfg_cutoff": cfg_cutoff}
        return replace(self, **{k: float(v) for k, v in given.items() if v is not None})

    @classmethod
    def read(cls, directory: Path) -> "GenerationDefaults":
        path = Path(directory) / cls.FILE
        if not path.exists():
            return cls()
        try:
            raw = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise JanusError(f"{path}: not readable JSON ({e})") from None
        if not isinstance(raw, dict):
            raise JanusError(f"{path}: expected an object of defaults, got {type(raw).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise JanusError(f"{path}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        for key, value in raw.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise JanusError(f"{path}: '{key}' must be a number, got {value!r}")
        try:
            return cls(**{k: float(v) for k, v in raw.items()})
        except JanusError as e:
            raise JanusError(f"{path}: {e}") from None

    def write(self, directory: Path) -> None:
        path = Path(directory) / self.FILE
        if self == GenerationDefaults():
            path.unlink(missing_ok=True)
        else:
            weights.write_json(path, asdict(self))


@dataclass
class ChatReply:
    text: str
    token_ids: list[int]
    finish_reason: str = "stop"  # "stop" (EOS) or "length"
    prompt_tokens: int = 0


@dataclass
class ImageResult:
    images: list  # PIL images
    tokens: torch.Tensor  # (n_total, image_tokens) VQ codes
    prompts: list[str] = field(default_factory=list)


class Janus:
    """A loaded model with its processor; all inference goes through here."""

    # Parts that run once per image, not once per token: kept on the CPU in low-memory mode.
    OFFLOADABLE = ("vision_model", "aligner", "gen_vision_model")

    def __init__(self, model: JanusModel, processor: JanusProcessor, device="cpu", dtype=torch.float32,
                 low_memory: bool = False, generation: GenerationDefaults | None = None, compile: bool = False):
        self.model = model.eval()
        self.generation = generation or GenerationDefaults()
        self.processor = processor
        self.config: JanusConfig = model.config
        self.device = torch.device(device)
        self.dtype = dtype
        self.low_memory = low_memory
        # Decode steps compiled at fixed shapes, CUDA graphs on GPUs (`generate` module docstring). On CPUs with
        # AVX-512 BF16 the eager steps run januskit's kernels, which a compiled step cannot use.
        why = compile_unavailable(self.device) if compile else None
        if why is not None:
            logging.getLogger(__name__).warning("compile=True: %s; decoding stays eager", why)
        self.compile = compile and why is None

    @contextlib.contextmanager
    def _resident(self, *names: str):
        """In low-memory mode, bring offloaded submodules onto the device for the duration of a call."""
        if not self.low_memory or self.device.type == "cpu":
            yield
            return
        mods = [getattr(self.model, n) for n in names]
        for m in mods:
            m.to(self.device)
        try:
            yield
        finally:
            for m in mods:
                m.to("cpu")
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    # ------------------------------------------------------------------------------------------ files
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike | None = None, device="cpu", dtype=torch.float32,
                        low_memory: bool = False, compile: bool = False) -> "Janus":
        """Load a checkpoint directory (official or transformers layout), a hub id, or the bundled model.

        `low_memory=True` keeps the understanding encoder and the VQ tokenizer on the CPU and moves each onto
        the device only while it runs, so the device holds little more than the language model. `compile=True`
        compiles the decode steps (CUDA graphs on GPUs; the first calls compile, see `generate._compiled_step`).
        """
        directory = resolve_model_path(path)
        device, dtype = resolve_device(device), resolve_dtype(dtype)
        offloaded = tuple(f"{n}." for n in cls.OFFLOADABLE)
        place = (lambda name: "cpu" if name.startswith(offloaded) else device) if low_memory else device
        try:
            config = JanusConfig.from_file(directory / "config.json")
            model = weights.build_on_meta(config)
            sd = weights.read_state_dict(directory)
            weights.load_into(model, sd, device=place, dtype=dtype, source=str(directory))
            del sd
            processor = JanusProcessor.from_pretrained(directory, num_image_tokens=config.num_image_tokens)
        except (ConfigError, weights.CheckpointError, ProcessorError) as e:
            raise JanusError(str(e)) from None
        return cls(model, processor, device, dtype, low_memory=low_memory,
                   generation=GenerationDefaults.read(directory), compile=compile)

    def save_pretrained(self, directory: str | os.PathLike, layout: str = "official") -> Path:
        """Write config, weights and processor files in the official or the transformers (`hf`) layout."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        sd = self.model.state_dict()
        if layout == "official":
            config = self.config.to_official_dict()
        elif layout == "hf":
            sd = hf_layout.official_to_hf(sd)
            config = hf_layout.hf_config_dict(self.config)
            p = self.processor
            config["image_token_id"] = p.image_id
            config["text_config"].update(bos_token_id=p.bos_id, eos_token_id=p.eos_id, pad_token_id=p.pad_id)
        else:
            raise JanusError(f"unknown layout {layout!r}; use 'official' or 'hf'")
        weights.save_state_dict(sd, directory)
        weights.write_json(directory / "config.json", config)
        self.processor.save_pretrained(directory)
        self.generation.write(directory)
        return directory

    def to(self, device=None, dtype=None) -> "Janus":
        if device is not None:
            self.device = resolve_device(device)
        if dtype is not None:
            self.dtype = resolve_dtype(dtype)
        self.model.to(device=self.device, dtype=self.dtype)
        return self

    # ------------------------------------------------------------------------------------------ understanding
    def _conversation(self, prompt, images, messages) -> list[dict[str, Any]]:
        if messages is not None:
            if prompt is not None or images:
                raise JanusError("pass either a prompt (with images) or messages, not both")
            if not isinstance(messages, list) or not messages:
                raise JanusError("messages must be a non-empty list of {'role', 'content'} dicts")
            messages = [dict(m) for m in messages]
            if messages[-1].get("role") not in ("<|Assistant|>", "assistant") or messages[-1].get("content"):
                messages.append({"role": "<|Assistant|>", "content": ""})
            return messages
        if prompt is None:
            raise JanusError("nothing to answer: give a prompt or messages")
        images = list(images or [])
        if images and "<image_placeholder>" not in prompt:
            prompt = "<image_placeholder>\n" * len(images) + prompt
        return [{"role": "<|User|>", "content": prompt, "images": images}, {"role": "<|Assistant|>", "content": ""}]

    def _encode_conversations(self, conversations, system_prompt):
        encoded = []
        for conv in conversations:
            try:
                encoded.append(self.processor.encode_conversation(conv, system_prompt=system_prompt))
            except ProcessorError as e:
                raise JanusError(str(e)) from None
        return encoded

    def _prompt_embeds(self, encoded, max_new_tokens):
        limit = self.config.llm.max_position_embeddings
        for e in encoded:
            if len(e.input_ids) + max_new_tokens > limit:
                raise JanusError(
                    f"prompt of {len(e.input_ids)} tokens plus max_new_tokens={max_new_tokens} exceeds the "
                    f"context length {limit}"
                )
        batch = self.processor.batch(encoded).to(self.device, dtype=self.dtype)
        with torch.inference_mode(), self._resident("vision_model", "aligner"):
            embeds = self.model.embed(batch.input_ids, batch.image_mask, batch.pixel_values)
        return embeds, batch.attention_mask

    def _text_steps(self, conversations, system_prompt, max_new_tokens, temperature, top_k, top_p, seed):
        if max_new_tokens < 1:
            raise JanusError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        encoded = self._encode_conversations(conversations, system_prompt)
        embeds, attn = self._prompt_embeds(encoded, max_new_tokens)
        gen = _generator(seed, self.device)
        steps = generate_text(self.model, embeds, attn, self.processor.eos_id, max_new_tokens, temperature,
                              top_k, top_p, gen, compiled=self.compile)
        return encoded, steps

    def chat(self, prompt: str | None = None, images=None, messages=None, max_new_tokens: int = 256,
             temperature: float = 0.0, top_p: float | None = None, top_k: int | None = None, seed: int | None = None,
             system_prompt: str | None = None) -> ChatReply:
        """Answer one conversation. `temperature=0` is greedy."""
        return self.chat_batch([self._conversation(prompt, images, messages)], max_new_tokens, temperature, top_p,
                               top_k, seed, system_prompt)[0]

    def chat_batch(self, conversations: list[list[dict]], max_new_tokens: int = 256, temperature: float = 0.0,
                   top_p: float | None = None, top_k: int | None = None, seed: int | None = None,
                   system_prompt: str | None = None) -> list[ChatReply]:
        """Answer several conversations in one left-padded batch."""
        conversations = [self._conversation(None, None, c) for c in conversations]
        encoded, steps = self._text_steps(conversations, system_prompt, max_new_tokens, temperature, top_k, top_p, seed)
        B = len(encoded)
        out: list[list[int]] = [[] for _ in range(B)]
        done = [False] * B
        for tok, finished in steps:
            for i in range(B):
                if not done[i]:
                    out[i].append(int(tok[i]))
                    done[i] = bool(finished[i])
        eos = self.processor.eos_id
        replies = []
        for i, ids in enumerate(out):
            stopped = bool(ids) and ids[-1] == eos
            body = ids[:-1] if stopped else ids
            replies.append(ChatReply(self.processor.decode(body), ids, "stop" if stopped else "length",
                                     len(encoded[i].input_ids)))
        return replies

    def stream_chat(self, prompt: str | None = None, images=None, messages=None, max_new_tokens: int = 256,
                    temperature: float = 0.0, top_p: float | None = None, top_k: int | None = None,
                    seed: int | None = None, system_prompt: str | None = None) -> Iterator[str]:
        """Yield the answer as text pieces while it is generated (pieces concatenate to `chat(...).text`)."""
        conv = self._conversation(prompt, images, messages)
        _, steps = self._text_steps([conv], system_prompt, max_new_tokens, temperature, top_k, top_p, seed)
        ids: list[int] = []
        sent = ""
        for tok, _ in steps:
            t = int(tok[0])
            if t == self.processor.eos_id:
                break
            ids.append(t)
            text = self.processor.decode(ids)
            if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the rest
                continue
            if text[len(sent):]:
                yield text[len(sent):]
                sent = text
        text = self.processor.decode(ids)
        if text[len(sent):]:
            yield text[len(sent):]

    # ------------------------------------------------------------------------------------------ generation
    def generate_images(self, prompt: str | list[str], n: int = 1, cfg_weight: float | None = None,
                        temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                        seed: int | None = None, on_step=None, cfg_cutoff: float | None = None) -> ImageResult:
        """Text-to-image: `n` images per prompt, several prompts batched; `temperature=0` is greedy.

        `cfg_weight` and `cfg_cutoff` (see `sampling.cfg_merge`) default to the checkpoint's `generation`.
        """
        decoding = self.generation.override(cfg_weight, cfg_cutoff)
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts:
            raise JanusError("no prompt given")
        if not isinstance(n, int) or n < 1:
            raise JanusError(f"n must be an integer >= 1, got {n!r}")
        if temperature < 0:
            raise JanusError(f"temperature must be >= 0, got {temperature}")
        cond, uncond = zip(*(self.processor.generation_ids(p) for p in prompts))
        num = self.config.image_tokens_per_image
        longest = max(len(c) for c in cond)
        if longest + num > self.config.llm.max_position_embeddings:
            raise JanusError(f"prompt of {longest} tokens plus {num} image tokens exceeds the context length "
                             f"{self.config.llm.max_position_embeddings}")
        tokens = generate_image_tokens(
            self.model, list(cond), list(uncond), self.processor.pad_id, n=n, cfg_weight=decoding.cfg_weight,
            cfg_cutoff=decoding.cfg_cutoff, temperature=temperature, top_k=top_k, top_p=top_p,
            generator=_generator(seed, self.device),
            num_tokens=num, on_step=on_step, compiled=self.compile,
        )
        images = self.decode_image_tokens(tokens)
        return ImageResult(images, tokens.cpu(), [p for p in prompts for _ in range(n)])

    @torch.inference_mode()
    def decode_image_tokens(self, tokens: torch.Tensor, batch_size: int = 8) -> list:
        vq = self.model.gen_vision_model
        out = []
        with self._resident("gen_vision_model"):
            for chunk in tokens.split(batch_size):
                out += to_pil(vq.decode_codes(chunk.to(self.device), grid=self.config.vq.grid).float())
        return out

    def quantize_int8(self) -> "Janus":
        """Switch the per-token decode weights (decoder blocks, image head) to int8 weight-only."""
        from .quant import quantize_int8

        quantize_int8(self.model)
        return self

    @torch.inference_mode()
    def warm_up(self) -> None:
        """With `compile=True`, compile the decode steps now rather than in the first requests: a few short image
        and text decodes at two batch sizes and two cache lengths, after which the compiled steps take other sizes
        symbolically (`generate._compiled_step`). Does nothing for eager decoding."""
        if not self.compile:
            return
        cond, uncond = self.processor.generation_ids("warm-up")
        embeds = self.model.decoder.embed_tokens(cond.to(self.device)[None])  # (1, T, D): a text prompt
        for n, steps in ((1, 2), (2, 2), (1, 130)):
            generate_image_tokens(self.model, [cond], [uncond], self.processor.pad_id, n=n, num_tokens=steps,
                                  compiled=True)
            rows, mask = embeds.expand(n, -1, -1), torch.ones(n, embeds.shape[1], dtype=torch.long)
            for _ in generate_text(self.model, rows, mask, eos_id=-1, max_new_tokens=steps, compiled=True):
                pass

    def parameter_counts(self) -> dict[str, int]:
        return {name: sum(p.numel() for p in mod.parameters()) for name, mod in self.model.named_children()}


def _generator(seed: int | None, device) -> torch.Generator | None:
    if seed is None:
        return None
    gen = torch.Generator(device=torch.device(device))
    gen.manual_seed(int(seed))
    return gen
