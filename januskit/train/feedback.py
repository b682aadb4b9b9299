"""What a run tells its user: a progress line, a JSONL metrics log, TensorBoard when installed, and sample
answers and images written into the run directory. Rank 0 only; other ranks get a silent instance.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..data.sample import GROUPS

log = logging.getLogger("januskit.train")

SHORT = {"understanding": "und", "text": "text", "generation": "gen"}


@dataclass
class StepStats:
    """One optimizer step, reduced over all ranks."""

    step: int  # optimizer steps completed (1-based)
    loss: float  # mean over every loss token of the step
    group_loss: dict[str, float | None]  # mean per group (None: no tokens of that group in the step)
    group_tokens: dict[str, int]
    lr: float
    grad_norm: float
    tokens: int  # non-padding tokens processed
    loss_tokens: int
    samples: int
    seconds: float
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        d = {"step": self.step, "loss": self.loss, "lr": self.lr, "grad_norm": self.grad_norm,
             "tokens": self.tokens, "loss_tokens": self.loss_tokens, "samples": self.samples,
             "seconds": self.seconds, "tokens_per_s": self.tokens / max(self.seconds, 1e-9)}
        for g in GROUPS:
            d[f"loss/{g}"] = self.group_loss[g]
            d[f"tokens/{g}"] = self.group_tokens[g]
        return {**d, **self.extra}


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class Feedback:
    def __init__(self, run_dir: Path, is_main: bool, total_steps: int, log_every: int = 1,
                 tensorboard: bool = True):
        self.run_dir = Path(run_dir)
        self.is_main = is_main
        self.total_steps = total_steps
        self.log_every = log_every
        self.recent: list[float] = []
        self.writer = None
        self.metrics = None
        if not is_main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics = open(self.run_dir / "metrics.jsonl", "a", buffering=1)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard not installed: the JSONL log is enough
                SummaryWriter = None
            if SummaryWriter is not None:
                self.writer = SummaryWriter(str(self.run_dir / "tensorboard"))

    def info(self, message: str) -> None:
        if self.is_main:
            log.info(message)

    def step(self, stats: StepStats) -> None:
        self.recent = (self.recent + [stats.seconds])[-20:]
        if not self.is_main:
            return
        record = {"time": time.time(), **stats.as_dict()}
        self.metrics.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and v is not None and k not in ("step", "time"):
                    self.writer.add_scalar(k, v, stats.step)
        if stats.step % self.log_every == 0 or stats.step == self.total_steps:
            log.info(self.progress_line(stats))

    def progress_line(self, stats: StepStats) -> str:
        groups = " ".join(f"{SHORT[g]} {v:.3f}" for g, v in stats.group_loss.items() if v is not None)
        eta = sum(self.recent) / max(len(self.recent), 1) * (self.total_steps - stats.step)
        return (f"step {stats.step}/{self.total_steps} | loss {stats.loss:.4f} ({groups}) | lr {stats.lr:.2e} | "
                f"grad {stats.grad_norm:.3f} | {stats.tokens / max(stats.seconds, 1e-9):,.0f} tok/s | "
                f"eta {_duration(eta)}")

    def data_report(self, step: int, stats: dict) -> None:
        """Data-source statistics (records read, skipped and why) into the log and the metrics file."""
        if not self.is_main or not stats:
            return
        self.metrics.write(json.dumps({"time": time.time(), "step": step, "data": stats}, default=str) + "\n")
        log.info("data at step %d: %s", step, json.dumps(stats, default=str, sort_keys=True))

    def samples(self, step: int, janus, prompts: list[str], images: list[str], question: str,
                max_new_tokens: int) -> Path | None:
        """Greedy answers and seeded images from the current weights, into `samples/step-XXXXXXXX/`."""
        if not self.is_main:
            return None
        out = self.run_dir / "samples" / f"step-{step:08d}"
        out.mkdir(parents=True, exist_ok=True)
        answers = []
        for image in images or [None]:
            reply = janus.chat(question, images=[image] if image else None, max_new_tokens=max_new_tokens,
                               temperature=0.0)
            answers.append({"image": image, "question": question, "answer": reply.text})
        for i, prompt in enumerate(prompts):
            result = janus.generate_images(prompt, n=1, seed=i, temperature=1.0)
            result.images[0].save(out / f"image-{i}.png")
            answers.append({"prompt": prompt, "image_file": f"image-{i}.png"})
        (out / "samples.json").write_text(json.dumps(answers, indent=2, ensure_ascii=False) + "\n")
        log.info("samples at step %d written to %s", step, out)
        return out

    def close(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
        if self.writer is not None:
            self.writer.close()
