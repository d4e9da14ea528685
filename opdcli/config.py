"""Typed, strict configuration for every command.

A config is built in three layers: the dataclass defaults, then a YAML file, then
`--set a.b=c` overrides. Every layer goes through the same strict builder: an unknown key is a
`ConfigError` that names the key and suggests the closest valid one, a value of the wrong type
is a `ConfigError` naming the expected type, and cross-field rules are checked at load time.
Configs are frozen; the resolved config is written to the run directory by the caller.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar, get_args

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
    """Compute dtype of the models. auto: bfloat16 on CUDA, float32 elsewhere."""
    master_weights: bool = True
    """With a bfloat16 / float16 run.dtype, keep the trained student's weights, gradients,
    optimizer state and checkpoints in float32 and run its forwards under torch.autocast (mixed
    precision, as HF Trainer / TRL with bf16=True). false trains the run.dtype weights themselves:
    half the weight memory, but AdamW loses every update below half a unit in the last place (at
    lr 1e-6 most bfloat16 weights never change). No effect when run.dtype is float32."""
    threads: int = 0
    """torch CPU threads; 0 keeps torch's default."""
    resume: str | None = None
    """Checkpoint directory (run_dir/checkpoints/step_N) to resume from."""
    overwrite: bool = False
    """Allow writing into a run directory that already holds metrics.jsonl."""
    allow_config_change: bool = False
    """On resume, continue with a config that differs from the checkpoint's run (beyond how long
    it runs and how it logs); the changes are recorded in config_changes.jsonl. Without it such a
    resume is refused."""
    ray_address: str | None = None
    """train.mode=async: the Ray cluster to join (None starts a local one)."""


@dataclass(frozen=True)
class LoraSpec:
    """A LoRA student: only low-rank adapters train (r 0: full fine-tuning)."""

    r: int = 0
    """Adapter rank; 0 trains every weight of the student."""
    alpha: float = 16.0
    """Scale numerator: the update is (alpha / r) B A."""
    dropout: float = 0.0
    """Dropout on the adapters' input."""
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj",
                                                               "gate_proj", "up_proj", "down_proj"])
    """Module names to adapt (Qwen3 / Llama naming)."""
    merge: bool = False
    """Checkpoints also hold the merged weights, a plain model folder in step_N/merged (the
    adapter alone is loaded on its base by `opd eval --model step_N` and by PEFT)."""


@dataclass(frozen=True)
class ModelConfig:
    """Student, teacher and optional reference models: hub names or local folders."""

    student: str = "toy:student"
    """Student model: hub name, local folder, or toy:student / toy:teacher (shipped toy models)."""
    teacher: str = "toy:teacher"
    """Teacher model, same forms as student. Must share the student's vocabulary."""
    teachers: dict[str, str] = field(default_factory=dict)
    """Domain teachers by tag (G-OPD's merge of domain experts, `opd train` only): a prompt whose
    data field `data.teacher_field` holds a tag is scored by that tag's teacher, a prompt without
    one by model.teacher; e.g. {math: ./rl-math, code: ./rl-code}. Every teacher must share the
    student's vocabulary. Sampled-token objectives (loss.objective=sampled or topk) on
    transformers scoring."""
    trust_remote_code: bool = False
    """Passed to from_pretrained."""
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    """Attention kernel for all models."""
    gradient_checkpointing: bool = False
    """Recompute the student's decoder-layer activations in backward instead of keeping them
    (long responses: activations of a 12k-token sequence would not fit otherwise)."""
    lora: LoraSpec = field(default_factory=LoraSpec)
    """LoRA adapters instead of full fine-tuning (model.lora.r > 0)."""


@dataclass(frozen=True)
class ToyTaskConfig:
    """Difficulty knobs of the embedded arithmetic task (used when data.source is toy)."""

    world: Literal["arith", "forms"] = "arith"
    """arith: the first toy world (expressions, one surface form, character tokens); forms: the
    second (one multiplication then n_ops additions / subtractions, each step in one of three
    surface forms, byte-level BPE; opdcli.toy.forms)."""
    n_ops: int = 2
    """Operators per problem (arith: n_ops + 1 operands; forms: the additions / subtractions
    after the first multiplication)."""
    max_operand: int = 20
    """Operands are drawn from 1..max_operand (the right operand of * from 2..9)."""
    ops: str = "+-*"
    """Operator alphabet (arith only)."""
    style: Literal["even", "symbolic", "words"] = "even"
    """forms only: the mixture of surface forms of the gold solutions (opdcli.toy.forms.STYLES)."""
    canonical_steps: int = 2
    """forms only: leading steps always written in the symbolic form, without a connective."""
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
    """Field with the reference final answer (optional; enables held-out accuracy). Dotted names
    reach into nested records, e.g. reward_model.ground_truth (DAPO-Math-17k)."""
    solution_field: str = "solution"
    """Field with a reference solution (needed by `opd distill` with traces: gold)."""
    teacher_field: str = "opd_teacher"
    """Field naming the prompt's teacher, a key of model.teachers (multi-teacher runs only)."""
    system_prompt: str | None = None
    """Optional system message prepended to every prompt."""
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra variables for the chat template, for training, rollouts and held-out evaluation
    alike, e.g. {enable_thinking: false} for Qwen3 (a key the template never reads is refused)."""
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
    stop_tokens: list[str] = field(default_factory=list)
    """Tokens that end a sample besides the student's EOS (its tokenizer's and generation
    config's), e.g. ["<|im_end|>"] for a Base student whose teacher ends answers with it
    (`opd doctor` says when)."""
    batch_size: int = 64
    """Sequences generated at once (hf engine; vLLM schedules its own batches)."""
    engine: Literal["hf", "vllm"] = "hf"
    """hf: our KV-cached transformers loop (hosts per-token stop rules); vllm: a vLLM engine
    (settings under `vllm`), the policy's weights pushed to it after every optimizer step."""


@dataclass(frozen=True)
class VLLMConfig:
    """The vLLM engines behind `rollout.engine=vllm` and `scoring.teacher_engine=vllm` (one per
    process, colocated with the learner), or the teacher's vLLM endpoint."""

    gpu_memory_utilization: float = 0.3
    """Share of the GPU's memory the engine may take (weights + KV cache); CUDA only."""
    kv_cache_space_gb: float = 1.0
    """KV cache size on CPU (VLLM_CPU_KVCACHE_SPACE); CPU only."""
    max_model_len: int | None = None
    """Longest prompt + response the engine accepts (null: prompt budget + max_new_tokens,
    checked against every batch)."""
    enforce_eager: bool = True
    """No CUDA graphs (faster start; false captures them, for long runs on GPU)."""
    enable_prefix_caching: bool = True
    """Share the KV cache of a prompt's n samples; the cache is reset after every weight push."""
    sleep: bool | None = None
    """Free the engine's GPU memory while the learner trains (sleep / wake_up). null: on CUDA,
    not on CPU, where vLLM has no sleep mode (true is refused there)."""
    weight_sync: Literal["inprocess", "folder", "nccl"] = "inprocess"
    """How new weights reach the engine: inprocess hands the tensors to the in-process engine's
    reload_weights; folder saves them (safetensors) and has the engine reload that folder (an engine
    in its own process); nccl broadcasts them from the learner's GPU to the rollout workers'
    engines, each on its own GPU (train.mode=async, CUDA)."""
    prompt_budget: int = 512
    """Prompt tokens reserved in the default max_model_len."""
    max_logprobs: int = 20
    """Most log-probs per position an engine returns (a vLLM teacher needs >= scoring.top_k)."""
    teacher_url: str | None = None
    """A running `vllm serve` endpoint (http://host:port) that scores the teacher, on other GPUs
    or nodes, instead of an in-process engine; model.teacher names the served model (its served
    name or the folder it was started on). Needs scoring.teacher_engine=vllm."""
    request_timeout_s: float = 600.0
    """Seconds one request to vllm.teacher_url may take."""
    request_retries: int = 3
    """Retries of a request that fails for a transient reason (unreachable, time-out, 5xx)."""
    max_concurrent_requests: int = 32
    """Requests (one per sequence) in flight to vllm.teacher_url at once."""


@dataclass(frozen=True)
class ScoringConfig:
    """Teacher and student per-token scoring."""

    top_k: int = 16
    """Top-K ids and log-probs kept per token for both models (1..64)."""
    chunk_tokens: int = 512
    """Positions per chunk when turning hidden states into log-probs."""
    batch_size: int = 64
    """Sequences per forward pass."""
    teacher_engine: Literal["hf", "vllm"] = "hf"
    """hf: transformers forwards; vllm: vLLM's prompt_logprobs, from an in-process engine or from
    the endpoint at vllm.teacher_url (the teacher's own tokens' log-probs and top-K; no logits, no
    log-probs on the student's top-K ids)."""
    student_scores: Literal["auto", "train_forward", "scoring_forward"] = "auto"
    """Take the student's per-token log-probs and top-K from the training forward instead of a
    separate no-grad scoring forward on the same tokens (the same numbers, one student forward
    fewer per step). Possible when the method reads no student score before training (plain
    opd), train.mode=sync, scoring.teacher_engine=hf and loss.objective is not topk. auto: when
    possible; train_forward: refused where not possible; scoring_forward: always score the
    student separately."""


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
    dual_clip: float | None = 3.0
    """Dual clip c > 1 of loss.surrogate=ppo: the loss of a negative-advantage token is at most
    -c * A (verl's default 3.0); null disables it."""
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
    on_nonfinite: Literal["stop", "skip"] = "stop"
    """A step whose teacher or student log-probs, loss or gradient norm is not finite: stop the
    run with one line naming the source (the update is not applied; checkpoints stay), or skip
    the step (no update; counted as train/skipped_steps)."""
    tensorboard: bool = False
    """Also log to tensorboard (needs the tensorboard package)."""
    wandb: bool = False
    """Also log to Weights & Biases: the config, every metrics row and the rollout samples as a
    table (pip install 'opd[tracking]'; WANDB_MODE=offline logs locally for a later wandb sync)."""
    trackio: bool = False
    """Also log to trackio, a local-first tracker with the same API (pip install 'opd[tracking]')."""
    tracking_project: str = "opd"
    """Project of the wandb / trackio run."""
    tracking_name: str | None = None
    """Run name in the trackers (default: the run directory's name)."""
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
    worker_gpus: float = 0.0
    """GPUs Ray reserves for each rollout worker (0: none; with vllm.weight_sync=nccl each worker
    needs a GPU of its own: 1)."""
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
    samples: int = 0
    """Also evaluate sampled answers: this many per problem at eval.temperature, reported as
    eval/heldout_sampled/accuracy (the mean over samples, avg@n); 0: greedy only."""
    temperature: float = 1.0
    """Temperature of the sampled evaluation (eval.samples > 0)."""
    seed: int = 1234
    """Seed of the sampled evaluation's noise: the same for every run and every evaluation, so
    two runs are compared on the same random numbers."""
    samples_every: int = 0
    """Sampled evaluation cadence: every N steps (a multiple of eval.every), and always before and
    after training; 0: at every evaluation. The sampled pass costs about eval.samples greedy
    ones, so a long sweep can keep a dense greedy curve and a sparse sampled one."""


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
    vllm: VLLMConfig = field(default_factory=VLLMConfig)


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
    vllm: VLLMConfig = field(default_factory=VLLMConfig)


from opdcli.config_io import (  # noqa: E402, F401  (re-exported: the builder lives beside the sections)
    build_dataclass,
    deep_merge,
    dump_config,
    flatten_keys,
    load_config,
    parse_overrides,
    read_yaml,
    to_dict,
    unknown_key_error,
)

