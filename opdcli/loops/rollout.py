"""`opd rollout`: sample from the student and score with the teacher, without training.

    opd rollout                                            # toy student, toy teacher, toy prompts
    opd rollout --student Qwen/Qwen3-1.7B --teacher Qwen/Qwen3-8B --prompts prompts.jsonl \\
        --out runs/rollouts.jsonl --n 4 --max-new-tokens 4096 --top-k 16
    opd rollout --set data.toy.n_ops=8 --set data.max_prompts=64   # the long-horizon toy variant

The configuration is `TrainRunConfig` (defaults, then the toy config or `--config`, then
`--set` overrides, then the flags): `model.*`, `data.*`, `rollout.*` (sampling), `scoring.*`,
`run.seed/device/dtype/threads`, and `method.*` / `loss.*` (the method's per-token and
per-trajectory outputs go into the records; default `opd`, uniform weights) are used. Keys of
the training loop (`optim.*`, `train.*`, `eval.*`, `run.out_dir/resume/overwrite`) have no
effect here and are refused when set with `--set`.

Prompts: every prompt of a prompt file (up to `data.max_prompts`), or for the toy task
`data.max_prompts` problems (default `rollout.prompts_per_step`). Each prompt gets
`rollout.samples_per_prompt` samples, processed `rollout.prompts_per_step` prompts at a time.
Every record has step 0 and policy_version 0, and stores the top-K (`scoring.top_k`, at most
64) of both models.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from opdcli.config import TrainRunConfig, flatten_keys, parse_overrides
from opdcli.doctor import preflight
from opdcli.errors import ConfigError
from opdcli.records import MAX_TOPK, RolloutWriter
from opdcli.run.progress import work_bar

UNUSED_PREFIXES = ("optim.", "train.", "eval.")
UNUSED_KEYS = ("run.out_dir", "run.resume", "run.overwrite")


@dataclass
class RolloutResult:
    out: str
    records: int
    tokens: int
    topk: int
    seconds: float


class _Renumber:
    """A writer wrapper giving every record a sample id that is unique across batches."""

    def __init__(self, writer: RolloutWriter) -> None:
        self.writer, self.count = writer, 0

    def write(self, record: dict[str, Any]) -> None:
        record["sample_id"] = f"0-{self.count}"
        self.count += 1
        self.writer.write(record)


def set_keys(overrides: list[str] | None) -> set[str]:
    """The dotted keys named by --set overrides (e.g. {"data", "data.toy", "data.toy.n_ops"})."""
    return flatten_keys(parse_overrides(list(overrides or [])))


def apply_flags(cfg: TrainRunConfig, *, student: str | None = None, teacher: str | None = None,
                prompts: str | None = None, n: int | None = None, max_new_tokens: int | None = None,
                top_k: int | None = None) -> TrainRunConfig:
    """The config with the command's flags applied on top (flags left at None change nothing)."""
    def pick(**values: Any) -> dict[str, Any]:
        return {k: v for k, v in values.items() if v is not None}

    return replace(
        cfg,
        model=replace(cfg.model, **pick(student=student, teacher=teacher)),
        data=replace(cfg.data, **pick(source=prompts)),
        rollout=replace(cfg.rollout, **pick(samples_per_prompt=n, max_new_tokens=max_new_tokens)),
        scoring=replace(cfg.scoring, **pick(top_k=top_k)),
    )


def check_rollout_config(cfg: TrainRunConfig, overrides: set[str]) -> None:
    """Refuse overrides that cannot take effect without training; check the scoring K."""
    from opdcli.validate import validate_common

    for key in sorted(overrides):
        if key.startswith(UNUSED_PREFIXES) or key in UNUSED_KEYS:
            raise ConfigError(f"{key} has no effect in opd rollout (nothing is trained or saved "
                              "besides the records); remove it, and use --out for the file")
    if cfg.data.source == "toy" and (cfg.data.toy.n_ops < 1 or cfg.data.toy.max_operand < 2):
        raise ConfigError(f"data.toy.n_ops is {cfg.data.toy.n_ops} and data.toy.max_operand is "
                          f"{cfg.data.toy.max_operand}; they must be at least 1 and 2")
    if not 1 <= cfg.scoring.top_k <= MAX_TOPK:
        raise ConfigError(f"the stored top-K (--top-k / scoring.top_k) is {cfg.scoring.top_k}; "
                          f"it must be in 1..{MAX_TOPK}")
    validate_common(cfg, overrides)


def _prompts(cfg: TrainRunConfig) -> list[Any]:
    from opdcli.data import PromptSource, read_rows, rows_to_prompts

    if cfg.data.source == "toy":
        count = cfg.data.max_prompts or cfg.rollout.prompts_per_step
        return PromptSource(cfg.data, cfg.run.seed).next_batch(count)
    return rows_to_prompts(read_rows(cfg.data.source, cfg.data.split), cfg.data, cfg.data.source)


def _check_out(out: Path, overwrite: bool) -> None:
    if out.is_dir():
        raise ConfigError(f"--out '{out}' is a folder; pass a file name such as {out / 'rollouts.jsonl'}")
    if out.exists() and out.stat().st_size > 0 and not overwrite:
        raise ConfigError(f"--out '{out}' already exists; pass --overwrite to replace it or "
                          "pick another file")


def _open_out(out: Path) -> RolloutWriter:
    out.unlink(missing_ok=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    return RolloutWriter(out)


def run_rollout(cfg: TrainRunConfig, out: str | Path, *, overrides: set[str] | None = None,
                overwrite: bool = False) -> RolloutResult:
    """Sample `rollout.samples_per_prompt` responses per prompt, score them, write records.

    Args:
        cfg: the resolved config (see the module docstring for the keys used).
        out: the rollouts.jsonl file to write.
        overrides: dotted keys set with --set (refused when they cannot take effect).
        overwrite: replace an existing non-empty `out`.
    """
    import torch

    from opdcli import stages
    from opdcli.assembly import assemble, check_engine, sampler_class, teacher_loading
    from opdcli.dist import ALONE
    from opdcli.engines.vllm_scorer import check_teacher_engine
    from opdcli.methods import build_method
    from opdcli.models import load_configured_pair, load_reference, load_teachers
    from opdcli.run.context import setup_process
    from opdcli.validate import check_routes, check_sampler

    out = Path(out)
    check_rollout_config(cfg, overrides or set())
    _check_out(out, overwrite)
    setup_process(cfg.run)
    method = build_method(cfg.method.name, cfg.method.options, cfg.loss)
    method.check_scoring(cfg.scoring.top_k)
    check_sampler(sampler_class(cfg), method)
    prompts = _prompts(cfg)  # data errors surface before models load
    check_routes(cfg, None if cfg.data.source == "toy" else {p.teacher for p in prompts if p.teacher}, method)
    check_teacher_engine(cfg, method)
    check_engine(cfg, cfg.model.student, "student")
    preflight(cfg)  # the pair's tokenizers, templates, EOS, context: `opd doctor`
    m = cfg.model
    pair = load_configured_pair(m, cfg.run.device, cfg.run.dtype, **teacher_loading(cfg))
    method.attach(pair.tokenizer)
    reference = load_reference(method.reference_model(m.student), pair, m)
    generator = torch.Generator(device=pair.device).manual_seed(cfg.run.seed)
    parts = assemble(cfg, pair, ALONE, generator, reference=reference, train=False,
                     teachers=load_teachers(pair, m))
    start, tokens = time.perf_counter(), 0
    run_id = uuid.uuid4().hex[:12]
    with _open_out(out) as writer:
        renumber = _Renumber(writer)
        size = cfg.rollout.prompts_per_step
        with work_bar(len(prompts), "opd rollout (prompts)") as bar:
            for a in range(0, len(prompts), size):
                got = _batch(cfg, parts, method, prompts[a:a + size], renumber, run_id, stages)
                tokens += got
                bar.advance(len(prompts[a:a + size]), got)
    return RolloutResult(str(out), renumber.count, tokens, cfg.scoring.top_k, time.perf_counter() - start)


def _batch(cfg: TrainRunConfig, parts, method, prompts: list[Any], writer: _Renumber, run_id: str, stages) -> int:
    """Sample, score, apply the method and write one batch of prompts; returns its tokens."""
    from opdcli.data import render
    from opdcli.dist import ALONE
    from opdcli.engines.hf_sampler import decode_responses
    from opdcli.records.rows import write_rollout_records

    tok = parts.sampler.tokenizer
    # the full rollout.max_new_tokens and no stop rule: records of whole responses
    rollout = stages.route(stages.sample(parts.sampler, [render(tok, p) for p in prompts],
                                         stages.sampling_params(cfg.rollout), ALONE), prompts)
    scored = stages.score(parts.scorer, rollout, "sampled")
    rows, whole = stages.gather(rollout, scored, ALONE)
    out = stages.weigh(method, whole, rows, cfg.loss, 0)
    write_rollout_records(writer, run_id, 0, prompts, rows, whole, out, decode_responses(tok, rows),
                          method.name, cfg.scoring.top_k)
    return int(scored.mask_B_T.sum())
