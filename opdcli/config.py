"""Typed, strict configuration for every command.

A config is built in three layers: the dataclass defaults, then a YAML file, then
`--set a.b=c` overrides. Every layer goes through the same strict builder: an unknown key is a
`ConfigError` that names the key and suggests the closest valid one, a value of the wrong type
is a `ConfigError` naming the expected type, and cross-field rules are checked at load time.
Configs are frozen; the resolved config is written to the run directory by the caller.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

import yaml

from opdcli.errors import ConfigError

T = TypeVar("T")

# ----------------------------------------------------------------------------------- pieces

ObjectiveName = Literal["sampled", "topk", "rkl", "fkl", "jsd"]
OBJECTIVES: tuple[str, ...] = get_args(ObjectiveName)
"""The base objectives (methods.md §1), in one place."""
FULL_DISTRIBUTION = frozenset({"rkl", "fkl", "jsd"})
"""Objectives differentiated analytically over the teacher's full distribution."""


@dataclass(frozen=True)
class RunConfig:
    """Where a run writes, how it is seeded, and where it runs."""

    out_dir: str = "runs/opd"
    """Run directory: config.yaml, metrics.jsonl, rollouts.jsonl, checkpoints/."""
    seed: int = 0
    """Seed of torch, python and the prompt stream."""
    device: str = "auto"
    """auto (CUDA when present, else CPU), cpu, cuda, cuda:N or mps."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Model dtype. auto: bfloat16 on CUDA, float32 elsewhere."""
    threads: int = 0
    """torch CPU threads; 0 keeps torch's default."""
    resume: str | None = None
    """Checkpoint directory (run_dir/checkpoints/step_N) to resume from."""
    overwrite: bool = False
    """Allow writing into a run directory that already holds metrics.jsonl."""
    ray_address: str | None = None
    """train.mode=async: the Ray cluster to join (None starts a local one)."""


@dataclass(frozen=True)
class ModelConfig:
    """Student, teacher and optional reference models: hub names or local folders."""

    student: str = "toy:student"
    """Student model: hub name, local folder, or toy:student / toy:teacher (shipped toy models)."""
    teacher: str = "toy:teacher"
    """Teacher model, same forms as student. Must share the student's vocabulary."""
    trust_remote_code: bool = False
    """Passed to from_pretrained."""
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    """Attention kernel for all models."""


@dataclass(frozen=True)
class ToyTaskConfig:
    """Difficulty knobs of the embedded arithmetic task (used when data.source is toy)."""

    n_ops: int = 2
    """Operators per problem (problem has n_ops + 1 operands)."""
    max_operand: int = 20
    """Operands are drawn from 1..max_operand (the right operand of * from 2..9)."""
    ops: str = "+-*"
    """Operator alphabet."""
    heldout_size: int = 512
    """Size of the held-out split (never seen in training)."""
    split_seed: int = 0
    """Seed of the held-out split; fixed apart from run.seed so every run shares one split."""


@dataclass(frozen=True)
class DataConfig:
    """Prompt source for training."""

    source: str = "toy"
    """toy, a .jsonl/.json/.parquet file, or hf:<dataset name>[:<config>]."""
    split: str = "train"
    """Split for hf: sources."""
    prompt_field: str = "prompt"
    """Field with the user prompt (a string, or a list of chat messages)."""
    answer_field: str = "answer"
    """Field with the reference final answer (optional; enables held-out accuracy)."""
    solution_field: str = "solution"
    """Field with a reference solution (needed by `opd distill` with traces: gold)."""
    system_prompt: str | None = None
    """Optional system message prepended to every prompt."""
    max_prompts: int | None = None
    """Use at most this many prompts from the source."""
    eval_source: str | None = None
    """Held-out prompts with answers; default: the toy held-out split when source is toy."""
    toy: ToyTaskConfig = field(default_factory=ToyTaskConfig)


@dataclass(frozen=True)
class RolloutConfig:
    """Student sampling."""

    prompts_per_step: int = 16
    """Prompts per optimizer step (before gradient accumulation)."""
    samples_per_prompt: int = 4
    """Samples per prompt (n)."""
    temperature: float = 1.0
    """Sampling temperature."""
    top_p: float = 1.0
    """Nucleus sampling; < 1 makes the sampler differ from the student (IS ratio corrects)."""
    top_k: int = 0
    """Top-k sampling; 0 disables."""
    max_new_tokens: int = 256
    """Generation budget per sample."""
    batch_size: int = 64
    """Sequences generated at once."""


@dataclass(frozen=True)
class ScoringConfig:
    """Teacher and student per-token scoring."""

    top_k: int = 16
    """Top-K ids and log-probs kept per token for both models (1..64)."""
    chunk_tokens: int = 512
    """Positions per chunk when turning hidden states into log-probs."""
    batch_size: int = 64
    """Sequences per forward pass."""


@dataclass(frozen=True)
class LossConfig:
    """The base objective (methods.md §1)."""

    objective: ObjectiveName = "sampled"
    """sampled: Variant A, topk: Variant B, rkl: C, fkl: D, jsd: E."""
    surrogate: Literal["is", "ppo", "pg"] = "is"
    """Policy-gradient surrogate for sampled / topk."""
    kl_coef: float = 1.0
    """Scale c of the sampled-token advantage."""
    discount: float = 0.0
    """Discount of the future-reward sum of the sampled-token advantage (0: per token)."""
    clip_low: float = 0.2
    """PPO clip below 1."""
    clip_high: float = 0.2
    """PPO clip above 1."""
    topk_weight: Literal["student_p", "teacher_p", "none"] = "student_p"
    """Candidate weights of the top-K objective."""
    support: Literal["full", "student_topk", "teacher_topk"] = "full"
    """Support of the analytic objectives rkl / fkl / jsd."""
    support_k: int = 16
    """K of a top-K support."""
    tail_bucket: bool = False
    """Add a pseudo-token carrying the mass outside a top-K support."""
    beta: float = 0.5
    """JSD interpolation (0: forward KL, 1: reverse KL)."""
    jsd_temperature: float = 1.0
    """Softmax temperature inside the JSD."""


@dataclass(frozen=True)
class OptimConfig:
    """AdamW and the learning-rate schedule."""

    lr: float = 1e-6
    """Peak learning rate."""
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = 0
    """Linear warmup from 0 to lr."""
    schedule: Literal["constant", "linear", "cosine"] = "constant"
    """Decay after warmup, down to min_lr_ratio * lr at max_steps."""
    min_lr_ratio: float = 0.0
    schedule_steps: int | None = None
    """Length of the decay schedule (default: train.max_steps); longer stops mid-schedule."""
    grad_clip: float = 1.0
    """Max global grad norm; 0 disables clipping."""
    grad_accum: int = 1
    """Micro-batches per optimizer step (the step's prompts are split evenly)."""


@dataclass(frozen=True)
class TrainConfig:
    """Loop cadences."""

    max_steps: int = 100
    """Optimizer steps."""
    save_every: int = 0
    """Checkpoint every N steps (0: only at the end)."""
    keep_checkpoints: int = 2
    """Keep the newest N periodic checkpoints (the final one is always kept)."""
    rollouts_every: int = 1
    """Append rollouts.jsonl records every N steps (0: never)."""
    rollouts_topk: int = 8
    """Top-K entries per token stored in rollouts.jsonl (<= scoring.top_k)."""
    tensorboard: bool = False
    """Also log to tensorboard (needs the tensorboard package)."""
    mode: Literal["sync", "async"] = "sync"
    """sync: sample then train each step; async: Ray rollout workers sample while the learner trains."""


@dataclass(frozen=True)
class AsyncConfig:
    """train.mode=async: rollout workers (Ray actors) and the batches in flight."""

    workers: int = 2
    """Rollout worker actors, each with its own copy of the student."""
    buffer: int = 4
    """Rollout batches in flight or waiting (bounds the version lag)."""
    max_lag: int | None = 4
    """Drop rows sampled more than this many versions ago (null: keep every row)."""
    worker_threads: int = 1
    """torch CPU threads per worker."""
    worker_scoring: bool = False
    """Workers also load the teacher and score the tokens they sampled; method fopd then measures
    the supervision drift of that stored signal (and trains on it with options.supervision=stored)."""
    max_restarts: int = 2
    """Times each worker is replaced after its process dies before the run stops (0: stop at once)."""


@dataclass(frozen=True)
class EvalConfig:
    """Periodic held-out evaluation (greedy, boxed-answer exact match)."""

    every: int = 50
    """Evaluate every N steps (0: only before and after training)."""
    size: int = 256
    """Held-out problems per evaluation."""
    batch_size: int = 256
    max_new_tokens: int = 0
    """0: use rollout.max_new_tokens."""
    enabled: bool = True


@dataclass(frozen=True)
class MethodConfig:
    """The weighting method (opd train --list-methods) and its own options."""

    name: str = "opd"
    options: dict[str, Any] = field(default_factory=dict)
    """Options validated against the method's own config class."""


@dataclass(frozen=True)
class DistConfig:
    """Data-parallel training under torchrun (ignored on one process)."""

    backend: Literal["auto", "gloo", "nccl"] = "auto"
    """Process-group backend: auto is NCCL on CUDA, gloo on CPU."""
    frozen_models: Literal["replicate", "shard"] = "replicate"
    """Teacher and reference: a full copy per rank, or sharded with FSDP2 for their no-grad
    forwards (less memory, an all-gather per layer)."""


@dataclass(frozen=True)
class DistillSpec:
    """Off-policy baseline: what the student learns from."""

    traces: Literal["teacher", "gold"] = "teacher"
    """teacher: the teacher samples traces; gold: reference solutions from the data."""
    mode: Literal["sft", "fkl"] = "sft"
    """sft: cross-entropy on the trace; fkl: token-level forward KL to the teacher."""


# ------------------------------------------------------------------------------- top level


@dataclass(frozen=True)
class TrainRunConfig:
    """`opd train`: on-policy distillation."""

    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    asynchronous: AsyncConfig = field(default_factory=AsyncConfig)


@dataclass(frozen=True)
class DistillRunConfig:
    """`opd distill`: off-policy distillation (SFT or forward-KL on teacher traces)."""

    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    """Sampling of the teacher's traces (teacher traces only)."""
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    distill: DistillSpec = field(default_factory=DistillSpec)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    dist: DistConfig = field(default_factory=DistConfig)


# ---------------------------------------------------------------------------- the builder


def _closest(name: str, options: list[str]) -> str:
    match = difflib.get_close_matches(name, options, n=1, cutoff=0.5)
    return f" Did you mean '{match[0]}'?" if match else ""


def unknown_key_error(key: str, prefix: str, options: list[str]) -> ConfigError:
    where = f"{prefix}{key}"
    return ConfigError(
        f"unknown config key '{where}'.{_closest(key, options)} "
        f"Valid keys{' under ' + prefix.rstrip('.') if prefix else ''}: {', '.join(options)}"
    )


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0])
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            names = ", ".join(repr(a) for a in allowed)
            raise ConfigError(
                f"config key '{where}' is {value!r}; allowed values: {names}."
                f"{_closest(str(value), [str(a) for a in allowed])}"
            )
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{where}' must be a mapping of its fields, got {value!r}")
        return build_dataclass(tp, value, prefix=f"{where}.")
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(get_args(tp)):
            raise ConfigError(f"config key '{where}' must be a list of {len(get_args(tp))} values")
        return tuple(_coerce(v, a, where) for v, a in zip(value, get_args(tp), strict=True))
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"config key '{where}' must be a list, got {value!r}")
        (arg,) = get_args(tp)
        return [_coerce(v, arg, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{where}' must be a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{where}' must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{where}' must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML 1.1 reads 1e-3 as a string
            except ValueError:
                pass
        raise ConfigError(f"config key '{where}' must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"config key '{where}' must be a string, got {value!r}")
    raise AssertionError(f"unsupported config type {tp} at {where}")


def build_dataclass(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Construct `cls` from a nested dict, rejecting unknown keys and wrong types."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in hints:
            raise unknown_key_error(str(key), prefix, names)
        kwargs[key] = _coerce(value, hints[key], f"{prefix}{key}")
    return cls(**kwargs)


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """Turn ["a.b=1", "c=x"] into a nested dict; values are parsed as YAML scalars."""
    tree: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value, e.g. optim.lr=1e-4")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = tree
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}' conflicts with another override of '{part}'")
        node[parts[-1]] = value
    return tree


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key != "options":
            out[key] = deep_merge(out[key], value)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = {**out[key], **value}
        else:
            out[key] = value
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file '{p}' does not exist; pass an existing YAML file to --config")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError(f"config file '{p}' is not valid YAML{where}: {problem}; fix the syntax") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file '{p}' is not UTF-8 text; pass a YAML file") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{p}' must hold a mapping at the top level, got {type(data).__name__}")
    return data


def flatten_keys(tree: dict[str, Any], prefix: str = "") -> set[str]:
    keys: set[str] = set()
    for key, value in tree.items():
        keys.add(f"{prefix}{key}")
        if isinstance(value, dict) and key != "options":
            keys |= flatten_keys(value, f"{prefix}{key}.")
    return keys


def load_config(
    cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None
) -> tuple[T, set[str]]:
    """Load `cls` from defaults <- YAML file <- overrides, strictly.

    Returns:
        The frozen config and the set of dotted keys the user set explicitly (file or flags),
        which cross-field validation uses to refuse flags that cannot take effect.
    """
    tree: dict[str, Any] = read_yaml(path) if path is not None else {}
    tree = deep_merge(tree, parse_overrides(overrides or []))
    cfg = build_dataclass(cls, tree)
    return cfg, flatten_keys(tree)


def to_dict(cfg: Any) -> dict[str, Any]:
    def convert(obj: Any) -> Any:
        if isinstance(obj, tuple):
            return [convert(o) for o in obj]
        if isinstance(obj, dict):
            return {k: convert(v) for k, v in obj.items()}
        return obj

    return convert(dataclasses.asdict(cfg))


def dump_config(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False), encoding="utf-8")
