"""Sample builders: one manifest record -> one `Sample` (token layout, shifted loss targets, images).

The recipe of Janus / Janus-Pro (Chen et al. 2024, 2025): plain next-token cross-entropy, no per-task weights.
Understanding and text samples take the loss on text only, never on image placeholders or on given prompts;
generation samples take it on the VQ codes only. Layouts (N = understanding tokens per image, M = VQ codes per
image, `[img]` = `<begin_of_image>` N x `<image_placeholder>` `<end_of_image>`, `_x_` = no loss on x):

    caption         _BOS [img]_ caption EOS                       (stage I `<image><text>`)
    caption_qa/vqa  _BOS [img] question "\\n"_ answer EOS           (stage II `<image>question<answer>`)
    interleaved     _BOS_ text _[img]_ text ... EOS
    text            _BOS_ text EOS
    chat            the 'deepseek' template of `processor.format_conversation`; loss on each assistant answer
                    (" " + content) and its closing EOS; system and user turns masked
    class_to_image, text_to_image, chat with an image answer:
                    _generation_ids(prompt)[0]_ code_1 ... code_M _<end_of_image>_
                    where the `<begin_of_image>` position predicts code_1 and code_i predicts code_i+1, as the
                    decode loop samples them; with probability `cfg_dropout` the prompt is replaced by the
                    unconditional row `generation_ids(prompt)[1]`, exactly what inference feeds for CFG.

With probability `first_sentence_prob` a caption (caption text, caption_qa answer, multi-sentence text-to-image
prompt) is cut to its first sentence (Janus stage II). Records that cannot make a sample raise `BrokenRecord`.
"""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..processor import ASSISTANT, ROLE_ALIASES, USER, ProcessorError, load_image
from .sample import IGNORE, Sample
from .sources import BrokenRecord, ImageRef, TarMembers, image_ref

if TYPE_CHECKING:
    from ..config import JanusConfig
    from ..processor import JanusProcessor
    from .codes import CodeSource

__all__ = ["SampleBuilder", "BrokenRecord", "first_sentence", "generation_image_names", "open_image", "KINDS"]

KINDS = ("caption", "caption_qa", "vqa", "interleaved", "text", "class_to_image", "text_to_image", "chat")
SYSTEM = "system"
ROLES = {**ROLE_ALIASES, SYSTEM: SYSTEM}  # record roles -> the template's

# A sentence ends at '.', '!' or '?' (closing quotes/brackets included) followed by whitespace.
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+(?=\S)")


def first_sentence(text: str) -> str:
    """The first sentence of `text` (the whole text when it has only one)."""
    text = text.strip()
    m = _SENTENCE_END.search(text)
    return text[: m.start()] + text[m.start(): m.end()].rstrip() if m else text


def _is_multi_sentence(text: str) -> bool:
    return _SENTENCE_END.search(text.strip()) is not None


def open_image(ref: ImageRef):
    """Read and decode an image for a record; a missing or undecodable file is a `BrokenRecord`."""
    try:
        data = ref.read()
    except OSError as e:
        raise BrokenRecord("missing image", f"{ref.path}: {e.strerror or e}") from None
    try:
        return load_image(data)
    except ProcessorError as e:
        raise BrokenRecord("bad image", f"{ref.path}: {e}") from None


def _role(m) -> str | None:
    role = m.get("role") if isinstance(m, dict) else None
    return ROLES.get(role) if isinstance(role, str) else None


def _str(record: dict, key: str, kind: str) -> str:
    value = record.get(key)
    if not isinstance(value, str) or not value.strip():
        raise BrokenRecord("malformed", f"a {kind} record needs a non-empty string '{key}', got {value!r}")
    return value


def _messages(record: dict) -> list[dict]:
    """Chat messages with roles normalised to the template's, checked for order: [system] user assistant ..."""
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BrokenRecord("malformed", "a chat record needs a non-empty 'messages' list")
    out = []
    for i, m in enumerate(messages):
        if _role(m) is None:
            raise BrokenRecord("malformed", f"messages[{i}]: needs a role among {sorted(ROLES)}")
        content = m.get("content", "")
        images = m.get("images", [])
        if not isinstance(content, str) or not isinstance(images, list):
            raise BrokenRecord("malformed", f"messages[{i}]: content must be a string and images a list")
        out.append({"role": _role(m), "content": content, "images": images})
    if out[0]["role"] == SYSTEM and out[0]["images"]:
        raise BrokenRecord("malformed", "the system message cannot carry images")
    turns = out[1:] if out[0]["role"] == SYSTEM else out
    for i, m in enumerate(turns):
        if m["role"] != (USER if i % 2 == 0 else ASSISTANT):
            raise BrokenRecord("malformed", "chat turns must alternate user, assistant, starting with the user")
    if not turns or turns[-1]["role"] != ASSISTANT:
        raise BrokenRecord("malformed", "a chat record must end with an assistant turn")
    return out


def generation_image_names(record: dict) -> list[str]:
    """Names of the images a record asks the model to generate (the ones that need VQ codes)."""
    kind = record.get("kind")
    if kind in ("class_to_image", "text_to_image") and isinstance(record.get("image"), str):
        return [record["image"]]
    if kind == "chat" and isinstance(record.get("messages"), list):
        return [name for m in record["messages"] if _role(m) == ASSISTANT and isinstance(m.get("images"), list)
                for name in m["images"] if isinstance(name, str)]
    return []


class _Layout:
    """A sample under construction: ids with, per position, whether the text head is trained to produce the
    token there, whether it is an understanding-image slot, and the VQ code fed there (-1: none)."""

    def __init__(self):
        self.ids: list[int] = []
        self.loss: list[bool] = []
        self.und: list[bool] = []
        self.codes: list[int] = []
        self.images: list[torch.Tensor] = []

    def add(self, ids, loss: bool = False, und: bool = False) -> None:
        ids = [int(i) for i in ids]
        self.ids += ids
        self.loss += [loss] * len(ids)
        self.und += [und] * len(ids)
        self.codes += [-1] * len(ids)

    def add_codes(self, codes: torch.Tensor, input_id: int) -> None:
        self.ids += [input_id] * len(codes)
        self.loss += [False] * len(codes)
        self.und += [False] * len(codes)
        self.codes += [int(c) for c in codes]

    def sample(self, group: str, kind: str, image_shape: tuple[int, int, int]) -> Sample:
        ids = torch.tensor(self.ids, dtype=torch.long)
        codes = torch.tensor(self.codes, dtype=torch.long)
        loss = torch.tensor(self.loss, dtype=torch.bool)
        # Shifted: position t is trained on what stands at t + 1; the last position predicts nothing.
        text_targets = torch.full_like(ids, IGNORE)
        text_targets[:-1] = torch.where(loss[1:], ids[1:], IGNORE)
        image_targets = torch.full_like(ids, IGNORE)
        image_targets[:-1] = torch.where(codes[1:] >= 0, codes[1:], IGNORE)
        pixels = torch.stack(self.images) if self.images else torch.zeros((0, *image_shape))
        return Sample(ids, text_targets, image_targets, torch.tensor(self.und, dtype=torch.bool), codes, pixels,
                      group=group, kind=kind)


class SampleBuilder:
    """Turns manifest records into `Sample`s for one model config and processor.

    `codes` supplies the VQ codes of generation images (`OnTheFlyCodes` or a precomputed `CodeCache`).
    """

    def __init__(self, processor: "JanusProcessor", config: "JanusConfig", codes: "CodeSource",
                 cfg_dropout: float = 0.1, first_sentence_prob: float = 0.25, max_len: int = 4096):
        if not 0 <= cfg_dropout <= 1 or not 0 <= first_sentence_prob <= 1:
            raise ValueError(f"cfg_dropout ({cfg_dropout}) and first_sentence_prob ({first_sentence_prob}) "
                             "must lie in [0, 1]")
        self.processor, self.config, self.codes = processor, config, codes
        self.cfg_dropout, self.first_sentence_prob, self.max_len = cfg_dropout, first_sentence_prob, max_len
        self.num_image_tokens = config.num_image_tokens
        self.num_codes = config.vq.num_tokens
        self.image_shape = (3, config.vision.image_size, config.vision.image_size)
        if (processor.num_image_tokens, processor.image_size) != (self.num_image_tokens, config.vision.image_size):
            raise ValueError(
                f"processor makes {processor.num_image_tokens} image tokens of {processor.image_size}px images, the "
                f"model takes {self.num_image_tokens} of {config.vision.image_size}px"
            )
        p = processor
        self.bos, self.eos, self.pad = p.bos_id, p.eos_id, p.pad_id
        self.image_id, self.boi, self.eoi = p.image_id, p.boi_id, p.eoi_id
        self.image_tag = p.special["image"]  # "<image_placeholder>" in chat text
        self._kinds = {
            "caption": self._caption_sample, "caption_qa": self._caption_qa_sample, "vqa": self._vqa_sample,
            "interleaved": self._interleaved_sample, "text": self._text_sample,
            "class_to_image": self._class_to_image_sample, "text_to_image": self._text_to_image_sample,
            "chat": self._chat_sample,
        }

    # ------------------------------------------------------------------ pieces
    def _encode(self, text: str) -> list[int]:
        return list(self.processor.encode(text, add_bos=False))

    def _caption(self, text: str, rng: random.Random) -> str:
        """With probability `first_sentence_prob`, only the first sentence (a draw is made for every caption)."""
        cut = rng.random() < self.first_sentence_prob
        return first_sentence(text) if cut else text

    def _add_image(self, layout: _Layout, base, name) -> None:
        pil = open_image(image_ref(base, name))
        layout.images.append(self.processor.understanding_transform(pil))
        layout.add([self.boi])
        layout.add([self.image_id] * self.num_image_tokens, und=True)
        layout.add([self.eoi])

    def _add_text_with_images(self, layout: _Layout, text: str, base, images, loss: bool = False) -> None:
        """Text whose `<image_placeholder>` tags each take the next name from the iterator `images`."""
        for i, part in enumerate(text.split(self.image_tag)):
            if i:
                name = next(images, None)
                if name is None:
                    raise BrokenRecord("malformed", f"more {self.image_tag} tags than images")
                self._add_image(layout, base, name)
            if part:
                layout.add(self._encode(part), loss=loss)

    def _codes(self, base, name) -> torch.Tensor:
        ref = image_ref(base, name)
        codes = self.codes.codes_for(ref)
        if codes.dim() != 1 or codes.numel() != self.num_codes:
            raise BrokenRecord("bad codes", f"{ref.path}: {tuple(codes.shape)} codes, the model generates "
                                            f"{self.num_codes} per image")
        if int(codes.min()) < 0 or int(codes.max()) >= self.config.vq.codebook_size:
            raise BrokenRecord("bad codes", f"{ref.path}: codes outside [0, {self.config.vq.codebook_size})")
        return codes

    def _generation(self, prompt_ids: tuple[list[int], list[int]], base, name, rng: random.Random) -> _Layout:
        cond, uncond = prompt_ids
        drop = rng.random() < self.cfg_dropout
        codes = self._codes(base, name)
        layout = _Layout()
        layout.add(uncond if drop else cond)
        if layout.ids[-1] != self.boi:
            raise ValueError("a generation prompt must end with <begin_of_image> (processor.generation_ids)")
        layout.add_codes(codes, self.pad)
        layout.add([self.eoi])
        return layout

    # ------------------------------------------------------------------ kinds
    def _caption_sample(self, r: dict, base, rng) -> tuple[_Layout, str]:
        text = self._caption(_str(r, "text", "caption"), rng)
        layout = _Layout()
        layout.add([self.bos])
        self._add_image(layout, base, r.get("image"))
        layout.add(self._encode(text) + [self.eos], loss=True)
        return layout, "understanding"

    def _qa(self, r: dict, base, answer: str, kind: str) -> tuple[_Layout, str]:
        layout = _Layout()
        layout.add([self.bos])
        self._add_image(layout, base, r.get("image"))
        layout.add(self._encode(_str(r, "question", kind) + "\n"))
        layout.add(self._encode(answer) + [self.eos], loss=True)
        return layout, "understanding"

    def _caption_qa_sample(self, r: dict, base, rng) -> tuple[_Layout, str]:
        return self._qa(r, base, self._caption(_str(r, "answer", "caption_qa"), rng), "caption_qa")

    def _vqa_sample(self, r: dict, base, rng) -> tuple[_Layout, str]:
        if not isinstance(r.get("qtype", ""), str):
            raise BrokenRecord("malformed", f"a vqa record's 'qtype' must be a string, got {r['qtype']!r}")
        return self._qa(r, base, _str(r, "answer", "vqa"), "vqa")

    def _interleaved_sample(self, r: dict, base, rng) -> tuple[_Layout, str]:
        segments = r.get("segments")
        if not isinstance(segments, list) or not segments:
            raise BrokenRecord("malformed", "an interleaved record needs a non-empty 'segments' list")
        layout = _Layout()
        layout.add([self.bos])
        for i, seg in enumerate(segments):
            if isinstance(seg, dict) and set(seg) == {"text"} and isinstance(seg["text"], str):
                layout.add(self._encode(seg["text"]), loss=True)
            elif isinstance(seg, dict) and set(seg) == {"image"}:
                self._add_image(layout, base, seg["image"])
            else:
                raise BrokenRecord("malformed", f"segments[{i}] must be {{'text': str}} or {{'image': name}}")
        layout.add([self.eos], loss=True)
        return layout, "understanding"

    def _text_sample(self, r: dict, base, rng) -> tuple[_Layout, str]:
        layout = _Layout()
        layout.add([self.bos])
        layout.add(self._encode(_str(r, "text", "text")) + [self.eos], loss=True)
        return layout, "text"

    def _class_to_image_sample(self, r: dict, base, rng) -> tuple[_Layout, str]:
        prompt_ids = self.processor.generation_ids(_str(r, "text", "class_to_image"))
        return self._generation(prompt_ids, base, r.get("image"), rng), "generation"

    def _text_to_image_sample(self, r: dict, base, rng) -> tuple[_Layout, str]:
        prompt = _str(r, "text", "text_to_image")
        if _is_multi_sentence(prompt):  # a long caption as the prompt: Janus trains on its first sentence too
            prompt = self._caption(prompt, rng)
        return self._generation(self.processor.generation_ids(prompt), base, r.get("image"), rng), "generation"

    def _chat_sample(self, r: dict, base, rng) -> tuple[_Layout, str]:
        messages = _messages(r)
        answers = [m for m in messages if m["role"] == ASSISTANT and m["images"]]
        if answers:
            return self._image_chat(messages, base, rng), "generation"
        # A chat with images is understanding data; a text-only chat is text data (Janus SFT's text share).
        group = "understanding" if any(m.get("images") for m in messages if isinstance(m, dict)) else "text"
        return self._text_chat(messages, base), group

    def _text_chat(self, messages: list[dict], base) -> _Layout:
        system = messages[0]["content"] if messages[0]["role"] == SYSTEM else None
        conv = []
        for m in messages[1:] if system is not None else messages:
            content = m["content"]
            if m["images"] and self.image_tag not in content:  # untagged images go first, as at inference
                content = (self.image_tag + "\n") * len(m["images"]) + content
            conv.append({"role": m["role"], "content": content})
        images = iter([name for m in messages for name in m["images"]])
        fmt = self.processor.format_conversation
        layout = _Layout()
        layout.add([self.bos])
        done = ""  # template text laid out so far
        for k, m in enumerate(conv):
            if m["role"] != ASSISTANT:
                continue
            if not m["content"].strip():
                raise BrokenRecord("malformed", "an assistant turn has neither content nor images")
            # The template up to "<|Assistant|>:" is given; what it adds for the answer (" " + content + EOS)
            # is what the model must produce there.
            prompt = fmt(conv[:k] + [{"role": ASSISTANT, "content": ""}], system_prompt=system)
            full = fmt(conv[: k + 1], system_prompt=system)
            if not (prompt.startswith(done) and full.startswith(prompt)):
                raise ValueError("processor.format_conversation is not prefix-consistent across turns")
            self._add_text_with_images(layout, prompt[len(done):], base, images)
            self._add_text_with_images(layout, full[len(prompt):], base, iter(()), loss=True)
            done = full
        if next(images, None) is not None:
            raise BrokenRecord("malformed", f"more images than {self.image_tag} tags")
        if layout.ids[-1] != self.eos:
            raise ValueError("the chat template must close an assistant answer with EOS")
        return layout

    def _image_chat(self, messages: list[dict], base, rng) -> _Layout:
        if messages[0]["role"] == SYSTEM:
            raise BrokenRecord("malformed", "an image-answer chat takes no system prompt (inference uses none)")
        last = messages[-1]
        if (any(m["images"] for m in messages[:-1]) or len(last["images"]) != 1 or last["content"].strip()):
            raise BrokenRecord("malformed", "an image-answer chat has text-only turns and ends with one assistant "
                                            "turn whose content is a single image")
        history = messages[:-1]
        if len(history) == 1:
            prompt_ids = self.processor.generation_ids(history[0]["content"])
        else:  # earlier turns stay in the prompt; the unconditional row blanks all of it, like generation_ids
            text = self.processor.format_conversation(
                [{"role": m["role"], "content": m["content"]} for m in history]
                + [{"role": ASSISTANT, "content": ""}], system_prompt="")
            cond = self.processor.encode(text) + [self.boi]
            prompt_ids = (cond, [cond[0]] + [self.pad] * (len(cond) - 2) + [cond[-1]])
        return self._generation(prompt_ids, base, last["images"][0], rng)

    # ------------------------------------------------------------------ entry
    def build(self, record: dict, base_dir: Path | TarMembers, rng: random.Random) -> Sample:
        """One record -> one `Sample`. `base_dir` is what image names resolve against (the manifest's directory
        or the tar sample); `rng` draws the first-sentence cut and the CFG dropout."""
        kind = record.get("kind")
        if not isinstance(kind, str) or kind not in self._kinds:
            raise BrokenRecord("malformed", f"unknown record kind {kind!r} (kinds: {', '.join(KINDS)})")
        layout, group = self._kinds[kind](record, base_dir, rng)
        if len(layout.ids) > self.max_len:
            raise BrokenRecord("too long", f"{len(layout.ids)} tokens, max_len is {self.max_len}")
        sample = layout.sample(group, kind, self.image_shape)
        if sample.num_loss_tokens == 0:
            raise BrokenRecord("malformed", "the record leaves no token to learn")
        return sample
