"""The three Janus training stages as data: which parameters train, which stay frozen.

Janus (Wu et al. 2024) and Janus-Pro (Chen et al. 2025), section 3: stage I trains only the adaptors and the
image head (the LLM and both visual encoders frozen); stage II unfreezes the LLM (unified pre-training);
stage III (supervised fine-tuning) also unfreezes the understanding encoder. The VQ tokenizer never trains.
Patterns are fnmatch patterns over parameter names (`language_model.model.layers.*`).
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase

from torch import nn

ADAPTORS = ("aligner.*", "gen_aligner.*", "gen_head.*", "gen_embed.*", "image_pos_embed")
# SigLIP's attention-pool head ships with the weights but is no part of the Janus forward: it never trains.
UNUSED = ("vision_model.vision_tower.attn_pool.*",)


@dataclass(frozen=True)
class StagePlan:
    """A parameter trains when it matches a `trainable` pattern and no `frozen` pattern."""

    stage: int
    trainable: tuple[str, ...]
    frozen: tuple[str, ...]

    def is_trainable(self, name: str) -> bool:
        return any(fnmatchcase(name, p) for p in self.trainable) and not any(fnmatchcase(name, p) for p in self.frozen)


STAGES: dict[int, StagePlan] = {
    1: StagePlan(1, ADAPTORS, UNUSED),
    2: StagePlan(2, ("*",), ("vision_model.*", "gen_vision_model.*")),
    3: StagePlan(3, ("*",), ("gen_vision_model.*", *UNUSED)),
}


def stage_plan(stage: int, trainable: list[str] | tuple[str, ...] = (),
               frozen: list[str] | tuple[str, ...] = ()) -> StagePlan:
    """The plan of `stage`; non-empty `trainable` replaces its trainable patterns, `frozen` adds to its frozen ones."""
    try:
        base = STAGES[stage]
    except KeyError:
        raise ValueError(f"unknown stage {stage!r}; stages are {', '.join(map(str, STAGES))}") from None
    return StagePlan(stage, tuple(trainable) or base.trainable, base.frozen + tuple(frozen))


def apply_stage(model: nn.Module, plan: StagePlan) -> list[str]:
    """Set requires_grad from the plan and return the trainable parameter names (error if there are none)."""
    names = []
    for name, p in model.named_parameters():
        p.requires_grad_(plan.is_trainable(name))
        if p.requires_grad:
            names.append(name)
    if not names:
        raise ValueError(f"stage {plan.stage}: patterns {plan.trainable} minus {plan.frozen} select no parameter")
    set_train_mode(model)
    return names


def set_train_mode(model: nn.Module, training: bool = True) -> nn.Module:
    """`model.train(training)`, then every module whose parameters are all frozen goes to eval mode."""
    model.train(training)
    for mod in model.modules():
        params = list(mod.parameters())
        if params and not any(p.requires_grad for p in params):
            mod.eval()
    return model
