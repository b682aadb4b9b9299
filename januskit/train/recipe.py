"""Training recipes: typed dataclasses read from TOML, with `--set key.sub=value` overrides checked against them.

A recipe says everything about a run: where the weights come from, which stage (and so which modules train),
optimizer and schedule, batch geometry, precision, parallelism, checkpointing, feedback and the data mixture.
Shipped recipes live in `januskit/recipes/*.toml` and are found by name; any other path works too.
Relative data-source paths in a recipe file are relative to that file; every other relative path (output_dir,
model paths, and anything given with --set) is relative to the working directory.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RECIPES_DIR = Path(__file__).resolve().parents[1] / "recipes"

STRATEGIES = ("single", "ddp", "fsdp")
DTYPES = ("fp32", "bf16")
PRECISIONS = ("autocast", "pure")
SCHEDULES = ("constant", "cosine")


class RecipeError(ValueError):
    """A recipe or override that cannot be used; the message names the key."""


@dataclass
class ModelRecipe:
    """Where the weights come from. Empty strings mean "not given" (TOML has no null)."""

    checkpoint: str = ""  # a Janus checkpoint dir (januskit, official or transformers layout): config + weights
    preset: str = "tiny"  # the architecture when there is no checkpoint
    llm: str = ""  # part checkpoints loaded over a random init; parts not given stay random
    siglip: str = ""
    vq: str = ""
    processor: str = ""  # tokenizer/processor files; default: checkpoint, else llm, else the bundled model
    init_seed: int = 0
    init_std: float = 0.02


@dataclass
class TrainRecipe:
    stage: int = 1  # 1, 2 or 3 (see stages.py)
    trainable: list[str] = field(default_factory=list)  # fnmatch patterns replacing the stage's trainable set
    frozen: list[str] = field(default_factory=list)  # fnmatch patterns frozen on top of the stage's choice
    steps: int = 100
    global_batch: int = 8  # samples per optimizer step, all ranks together
    micro_batch: int = 4  # packed rows per forward; the global batch is reached by accumulation
    max_len: int = 512
    packing: bool = True
    dtype: str = "fp32"  # fp32 | bf16
    precision: str = "autocast"  # with bf16: autocast (fp32 weights) or pure (bf16 weights and optimizer state)
    strategy: str = "single"  # single | ddp | fsdp (ddp and fsdp under torchrun)
    activation_checkpointing: bool = False
    # torch.compile the decoder blocks for the training forward and backward (inference stays eager); on the CPU
    # it needs a C++ compiler (without one the run warns and stays eager). The first steps pay the compilation.
    compile: bool = False
    device: str = "auto"  # auto (cuda when available) | cpu | cuda
    seed: int = 0


@dataclass
class OptimRecipe:
    """AdamW with linear warm-up, then a constant learning rate (Janus-Pro) or a cosine decay to zero at
    `train.steps` (Janus stage I)."""

    lr: float = 1e-3
    warmup_steps: int = 0
    schedule: str = "constant"  # constant | cosine
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.0
    clip: float = 1.0
    # LR multipliers by fnmatch pattern over parameter names ({"aligner.*" = 0.1}); the first pattern that matches
    # a parameter wins, the others train at `lr`. The schedule scales every group alike.
    lr_scale: dict[str, float] = field(default_factory=dict)


@dataclass
class CheckpointRecipe:
    every: int = 1000  # steps between checkpoints (and one at the end); 0: only at the end
    keep: int = 3  # most recent checkpoints kept


@dataclass
class FeedbackRecipe:
    log_every: int = 1
    sample_every: int = 0  # steps between sample answers/images written into the run dir; 0: never
    sample_prompts: list[str] = field(default_factory=lambda: ["a red circle on a white background"])
    sample_images: list[str] = field(default_factory=list)  # asked `sample_question` about each
    sample_question: str = "Describe this image."
    sample_max_new_tokens: int = 32
    tensorboard: bool = True  # when tensorboard is importable


@dataclass
class DataRecipe:
    """Sample building plus the mixture (`ratio` and `sources` go to MixtureSpec.from_dict)."""

    codes: str = ""  # a VQ code cache directory; empty: encode generation images on the fly
    cfg_dropout: float = 0.1  # probability of dropping a generation prompt (classifier-free guidance)
    first_sentence_prob: float = 0.25  # probability of cutting a caption to its first sentence (builder default)
    ratio: dict[str, float] = field(default_factory=lambda: {"understanding": 1.0, "text": 0.0, "generation": 1.0})
    sources: list[dict[str, Any]] = field(default_factory=list)

    def mixture_dict(self) -> dict[str, Any]:
        return {"ratio": dict(self.ratio), "sources": [dict(s) for s in self.sources]}


@dataclass
class Recipe:
    name: str = "run"
    output_dir: str = "runs/run"
    model: ModelRecipe = field(default_factory=ModelRecipe)
    train: TrainRecipe = field(default_factory=TrainRecipe)
    optim: OptimRecipe = field(default_factory=OptimRecipe)
    checkpoint: CheckpointRecipe = field(default_factory=CheckpointRecipe)
    feedback: FeedbackRecipe = field(default_factory=FeedbackRecipe)
    data: DataRecipe = field(default_factory=DataRecipe)

    def validate(self) -> "Recipe":
        t, o = self.train, self.optim
        checks = [
            (t.stage in (1, 2, 3), "train.stage", "1, 2 or 3", t.stage),
            (t.dtype in DTYPES, "train.dtype", " or ".join(DTYPES), t.dtype),
            (t.precision in PRECISIONS, "train.precision", " or ".join(PRECISIONS), t.precision),
            (t.strategy in STRATEGIES, "train.strategy", ", ".join(STRATEGIES), t.strategy),
            (t.device in ("auto", "cpu", "cuda"), "train.device", "auto, cpu or cuda", t.device),
            (not (t.compile and t.strategy == "fsdp"), "train.compile", "false with train.strategy = fsdp (compiled "
             "blocks under FSDP2 are not tested yet)", t.compile),
            (t.steps >= 1, "train.steps", ">= 1", t.steps),
            (t.global_batch >= 1, "train.global_batch", ">= 1", t.global_batch),
            (t.micro_batch >= 1, "train.micro_batch", ">= 1", t.micro_batch),
            (t.max_len >= 2, "train.max_len", ">= 2", t.max_len),
            (o.lr >= 0, "optim.lr", ">= 0", o.lr),
            (o.schedule in SCHEDULES, "optim.schedule", " or ".join(SCHEDULES), o.schedule),
            (o.warmup_steps >= 0, "optim.warmup_steps", ">= 0", o.warmup_steps),
            (o.clip > 0, "optim.clip", "> 0", o.clip),
            (all(v > 0 for v in o.lr_scale.values()), "optim.lr_scale", "> 0 for every pattern", o.lr_scale),
            (self.checkpoint.every >= 0, "checkpoint.every", ">= 0", self.checkpoint.every),
            (self.checkpoint.keep >= 1, "checkpoint.keep", ">= 1", self.checkpoint.keep),
            (self.feedback.log_every >= 1, "feedback.log_every", ">= 1", self.feedback.log_every),
            (0 <= self.data.cfg_dropout <= 1, "data.cfg_dropout", "in [0, 1]", self.data.cfg_dropout),
            (0 <= self.data.first_sentence_prob <= 1, "data.first_sentence_prob", "in [0, 1]",
             self.data.first_sentence_prob),
        ]
        for ok, key, want, got in checks:
            if not ok:
                raise RecipeError(f"recipe {self.name!r}: {key} must be {want}, got {got!r}")
        if not self.model.checkpoint and not self.model.preset:
            raise RecipeError(f"recipe {self.name!r}: set model.checkpoint or model.preset")
        fields = source_fields()
        for i, source in enumerate(self.data.sources):
            _check_source(source, f"data.sources[{i}]" + (f" ({source['name']!r})" if "name" in source else ""),
                          fields)
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Recipe":
        return _build(cls, d, "").validate()


# ---------------------------------------------------------------------------------------------- typed building
def _hints(klass) -> dict[str, Any]:
    return typing.get_type_hints(klass)


def _type_name(hint) -> str:
    if typing.get_origin(hint) is None:
        return getattr(hint, "__name__", str(hint))
    return str(hint).replace("typing.", "")


def _is_union(hint) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType)


def _takes_str(hint) -> bool:
    return hint is str or (_is_union(hint) and str in typing.get_args(hint))


def _check(value, hint, key: str):
    """`value` as type `hint` (ints widen to float); anything else is an error naming `key`."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return value
    if _is_union(hint):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        for arg in args:
            try:
                return _check(value, arg, key)
            except RecipeError:
                continue
        raise RecipeError(f"{key}: expected {_type_name(hint)}, got {type(value).__name__} {value!r}")
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise RecipeError(f"{key}: expected a table, got {value!r}")
        return _build(hint, value, key)
    if origin is list:
        (elem,) = typing.get_args(hint) or (Any,)
        if not isinstance(value, (list, tuple)):
            raise RecipeError(f"{key}: expected a list, got {value!r}")
        return [_check(v, elem, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        _, elem = typing.get_args(hint) or (str, Any)
        if not isinstance(value, dict):
            raise RecipeError(f"{key}: expected a table, got {value!r}")
        return {str(k): _check(v, elem, f"{key}.{k}") for k, v in value.items()}
    if hint is bool:
        ok = isinstance(value, bool)
    elif hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif hint is type(None):
        ok = value is None
    else:
        ok = isinstance(value, hint)
    if not ok:
        raise RecipeError(f"{key}: expected {_type_name(hint)}, got {type(value).__name__} {value!r}")
    return value


def source_fields() -> dict[str, Any]:
    """Field types of one mixture source (januskit.data.mixture.SourceSpec); empty if the data side is absent."""
    try:
        from ..data.mixture import SourceSpec
    except ImportError:
        return {}
    return typing.get_type_hints(SourceSpec)


def _check_source(source: dict[str, Any], where: str, fields: dict[str, Any]) -> None:
    unknown = sorted(set(source) - set(fields)) if fields else []
    if unknown:
        raise RecipeError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(fields)}")
    for k, v in source.items():
        if fields:
            source[k] = _check(v, fields[k], f"{where}.{k}")


def _build(klass, d: dict[str, Any], where: str):
    if not isinstance(d, dict):
        raise RecipeError(f"{where}: expected a table, got {d!r}")
    hints = _hints(klass)
    unknown = sorted(set(d) - set(hints))
    if unknown:
        raise RecipeError(f"{where or 'recipe'}: unknown key(s) {', '.join(unknown)}; known: {', '.join(hints)}")
    kwargs = {k: _check(v, hints[k], f"{where}.{k}" if where else k) for k, v in d.items()}
    return klass(**kwargs)


# ---------------------------------------------------------------------------------------------- overrides
def _parse_value(raw: str, hint=Any):
    """A TOML value (`3`, `1e-4`, `true`, `"x"`, `[1, 2]`); anything else is taken as a bare string, and so is
    a value for a string field that parses as something else (a path named `2024`)."""
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw
    return raw if _takes_str(hint) and not isinstance(value, (str, list)) else value


def apply_override(recipe: Recipe, assignment: str) -> Recipe:
    """Apply `key.sub=value` to `recipe` in place. Keys walk dataclass fields, table keys, and list items
    (by index or by their `name`, e.g. `data.sources.imagenet.path=/data/in1k`)."""
    key, sep, raw = assignment.partition("=")
    key = key.strip()
    if not sep or not key:
        raise RecipeError(f"--set {assignment!r}: expected key=value")
    parts = key.split(".")
    node, hint, fields = recipe, Recipe, None  # fields: the typed keys of a data source, once inside one
    for i, part in enumerate(parts):
        here = ".".join(parts[: i + 1])
        last = i == len(parts) - 1
        if dataclasses.is_dataclass(node):
            hints = _hints(type(node))
            if part not in hints:
                raise RecipeError(f"--set {key}: unknown key {here!r}; known: {', '.join(hints)}")
            if last:
                setattr(node, part, _check(_parse_value(raw, hints[part]), hints[part], here))
            else:
                node, hint = getattr(node, part), hints[part]
        elif isinstance(node, dict):
            if fields:
                if part not in fields:
                    raise RecipeError(f"--set {key}: unknown key {here!r}; known: {', '.join(fields)}")
                elem = fields[part]
            else:
                elem = (typing.get_args(hint) or (str, Any))[1]
            if last:
                node[part] = _check(_parse_value(raw, elem), elem, here)
            elif part not in node:
                raise RecipeError(f"--set {key}: unknown key {here!r}; known: {', '.join(node)}")
            else:
                node, hint = node[part], elem
        elif isinstance(node, list):
            if last:
                raise RecipeError(f"--set {key}: cannot replace a whole list item; set one of its keys")
            node, hint = node[_list_index(node, part, key, here)], (typing.get_args(hint) or (Any,))[0]
            if here.startswith("data.sources."):
                fields = source_fields()
        else:
            raise RecipeError(f"--set {key}: {'.'.join(parts[:i])!r} is a value, not a table")
    return recipe


def _list_index(items: list, part: str, key: str, here: str) -> int:
    if part.isdigit() and int(part) < len(items):
        return int(part)
    for j, item in enumerate(items):
        if isinstance(item, dict) and item.get("name") == part:
            return j
    names = [str(it.get("name")) for it in items if isinstance(it, dict) and "name" in it]
    raise RecipeError(f"--set {key}: no item {part!r} in {here.rsplit('.', 1)[0]!r} "
                      f"(indices 0..{len(items) - 1}{'; names: ' + ', '.join(names) if names else ''})")


# ---------------------------------------------------------------------------------------------- loading
def shipped_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.toml"))


def recipe_path(name_or_path: str | Path) -> Path:
    """A path to a TOML file, or the name of a shipped recipe (`tiny-stage1`, `janus-pro-7b-stage2`, ...)."""
    p = Path(name_or_path).expanduser()
    if p.is_file():
        return p
    shipped = RECIPES_DIR / f"{name_or_path}.toml"
    if shipped.is_file():
        return shipped
    raise RecipeError(f"no recipe file {str(p)!r} and no shipped recipe of that name; "
                      f"shipped: {', '.join(shipped_recipes())}")


def _relative_to(base: Path, p: str) -> str:
    return p if Path(p).expanduser().is_absolute() else str(base.resolve() / p)


def load_recipe(name_or_path: str | Path, overrides: list[str] = ()) -> Recipe:
    path = recipe_path(name_or_path)
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise RecipeError(f"{path}: not valid TOML ({e})") from None
    raw.setdefault("name", path.stem)
    try:
        recipe = _build(Recipe, raw, "")
    except RecipeError as e:
        raise RecipeError(f"{path}: {e}") from None
    for source in recipe.data.sources:  # data paths written in a recipe file are relative to that file
        if isinstance(source.get("path"), str):
            source["path"] = _relative_to(path.parent, source["path"])
        elif isinstance(source.get("path"), list):
            source["path"] = [_relative_to(path.parent, p) if isinstance(p, str) else p for p in source["path"]]
    for assignment in overrides:
        apply_override(recipe, assignment)
    return recipe.validate()
