"""Two CPU processes under torchrun (gloo), through the real command and data pipeline: DDP and FSDP2 follow
the single-process loss curve of the same recipe and global batch, and an FSDP run stopped after a (sharded)
checkpoint resumes onto the same curve."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# tiny-stage3 mixes all three groups; an odd global batch gives the two ranks 3 and 4 samples, so they also run
# different numbers of micro-batches (the shorter one pads with empty ones).
STEPS = 4


def sets(out: Path, processor: Path, *extra: str) -> list[str]:
    args = [f"output_dir={out}", f"model.processor={processor}", "train.global_batch=7", "train.micro_batch=1",
            "train.max_len=160", "checkpoint.every=0", "feedback.sample_every=0", "optim.warmup_steps=2", *extra]
    return [a for s in args for a in ("--set", s)]


def losses(run_dir: Path) -> list[tuple[int, float, float]]:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(d["step"], d["loss"], d["grad_norm"]) for d in lines if "loss" in d]


def torchrun(*args: str, resume: bool = False) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "januskit.cli", "train", "tiny-stage3", *args, *(["--resume"] if resume else [])]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]


@pytest.fixture(scope="module")
def single_curve(tmp_path_factory, official_tiny_dir):
    from januskit.cli import main

    out = tmp_path_factory.mktemp("single") / "run"
    assert main(["train", "tiny-stage3", *sets(out, official_tiny_dir, "model.preset=tiny", "model.checkpoint=",
                                                f"train.steps={STEPS}")]) == 0
    return losses(out)


def assert_same_curve(got, want, tol=2e-5):
    assert [s for s, _, _ in got] == [s for s, _, _ in want] == list(range(1, STEPS + 1))
    for (step, loss, grad), (_, ref_loss, ref_grad) in zip(got, want):
        assert abs(loss - ref_loss) < tol, (step, loss, ref_loss)
        assert abs(grad - ref_grad) < 10 * tol, (step, grad, ref_grad)


def test_ddp_matches_single_process(tmp_path, official_tiny_dir, single_curve):
    out = tmp_path / "run"
    torchrun(*sets(out, official_tiny_dir, "model.checkpoint=", f"train.steps={STEPS}", "train.strategy=ddp"))
    assert_same_curve(losses(out), single_curve)
    assert (out / "final" / "model.safetensors").exists()


def test_fsdp_matches_single_process_across_a_resume(tmp_path, official_tiny_dir, single_curve):
    out = tmp_path / "run"
    common = ["model.checkpoint=", "train.strategy=fsdp"]
    torchrun(*sets(out, official_tiny_dir, *common, "train.steps=2"))  # ends with a sharded checkpoint at step 2
    assert (out / "checkpoints" / "step-00000002" / "dcp").is_dir()
    torchrun(*sets(out, official_tiny_dir, *common, f"train.steps={STEPS}"), resume=True)
    assert_same_curve(losses(out), single_curve)
    from januskit import Janus

    assert Janus.from_pretrained(out / "final").chat("What color is it?", max_new_tokens=2).token_ids
