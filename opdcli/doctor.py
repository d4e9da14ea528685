"""`opd doctor`: the checks a student / teacher pair must pass before OPD means anything.

Token-level distillation silently goes wrong when the two models disagree on what a token id
is, on where an answer ends, or on the prompt format the teacher scores. Every check here reads
only tokenizers and config files (no weights), so it runs in seconds even for 8B models, and
`opd train` / `opd rollout` run it before loading anything (`preflight`).

Levels: `error` makes OPD wrong (the run is refused), `warning` is worth knowing (the run goes
on, the fix is named), `ok` says what was checked.

Typical use:
    findings = diagnose(cfg)
    for f in findings: print(f.level, f.check, f.detail, f.fix)
"""

from __future__ import annotations

import difflib
import warnings
from dataclasses import dataclass
from typing import Any, Literal

import torch

from opdcli.data import PromptSource, check_template_reads, heldout_prompts, render, template_source
from opdcli.engines.hf_sampler import eos_token_ids, stop_token_ids
from opdcli.errors import ConfigError, DataError, OpdError
from opdcli.models import load_tokenizer, resolve_device, resolve_dtype, resolve_model_path

PROBE_PROMPTS = 256
"""Prompts of the data source whose token lengths are checked against the context."""


@dataclass(frozen=True)
class Finding:
    level: Literal["error", "warning", "ok"]
    check: str
    detail: str
    fix: str = ""
    kind: type[OpdError] = ConfigError
    """The error class a refused run raises (bad data: DataError)."""

    def line(self) -> str:
        return f"{self.check}: {self.detail}" + (f"; {self.fix}" if self.fix else "")


@dataclass
class _Model:
    role: str
    name: str
    tok: Any
    config: Any
    gen: Any  # GenerationConfig or None

    @property
    def generation_config(self) -> Any:  # what eos_token_ids reads from a model
        return self.gen


def _load(role: str, name: str, trust_remote_code: bool) -> _Model:
    from transformers import AutoConfig, GenerationConfig

    path = resolve_model_path(name)
    tok = load_tokenizer(name, trust_remote_code)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code).get_text_config()
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read the config of '{name}': {str(exc).splitlines()[0]}") from None
    try:
        gen = GenerationConfig.from_pretrained(path)
    except OSError:
        gen = None
    return _Model(role, name, tok, config, gen)


def _token(tok: Any, i: int) -> str:
    return f"{tok.convert_ids_to_tokens(i)} ({i})"


def check_tokenizers(s: _Model, t: _Model, probe: str) -> list[Finding]:
    if s.tok.get_vocab() != t.tok.get_vocab():
        only = sorted(set(t.tok.get_vocab()) - set(s.tok.get_vocab()))[:3]
        return [Finding("error", "tokenizer", f"'{s.name}' and '{t.name}' have different vocabularies "
                        f"({len(s.tok)} vs {len(t.tok)} tokens; e.g. {only} only in the {t.role})",
                        "token-level distillation needs one tokenizer: pick models from the same family")]
    a = s.tok(probe, add_special_tokens=False)["input_ids"]
    b = t.tok(probe, add_special_tokens=False)["input_ids"]
    if a != b:
        at = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
        return [Finding("error", "tokenizer", f"same vocabulary, but the {t.role} splits a rendered prompt "
                        f"differently from token {at} on (its merges or normalizer differ)",
                        "use the student's tokenizer files for both models")]
    out = [Finding("ok", "tokenizer", f"one vocabulary of {len(s.tok)} tokens; a rendered prompt encodes to "
                   f"the same {len(a)} ids")]
    specials = set(s.tok.all_special_tokens) ^ set(t.tok.all_special_tokens)
    if specials:
        out.append(Finding("warning", "special tokens", f"declared special by one tokenizer only: "
                           f"{sorted(specials)[:6]}", "harmless for scoring; decoded texts may differ in "
                           "what skip_special_tokens removes"))
    return out


def check_widths(models: list[_Model]) -> list[Finding]:
    n = len(models[0].tok)
    out, widths = [], []
    for m in models:
        rows = int(m.config.vocab_size)
        widths.append(f"{m.role} {rows}")
        if rows < n:
            out.append(Finding("error", "vocabulary width", f"'{m.name}' has {rows} output logits but the "
                               f"tokenizer has {n} tokens", "use the tokenizer saved with these weights"))
    if not out:
        padded = any(int(m.config.vocab_size) != n for m in models)
        out.append(Finding("ok", "vocabulary width", f"heads: {', '.join(widths)} rows for {n} tokens"
                           + ("; every model is scored over the tokenizer's ids only" if padded else "")))
    return out


def check_templates(s: _Model, t: _Model, prompt: Any) -> list[Finding]:
    kwargs = dict(prompt.template_kwargs)
    out = []
    if kwargs:
        try:
            check_template_reads(s.tok, kwargs)
        except ConfigError as exc:
            out.append(Finding("error", "chat template", str(exc)))
            return out
    if not template_source(s.tok):
        return [Finding("error", "chat template", f"the student '{s.name}' has no chat template",
                        "add one to its tokenizer_config.json (or use the instruct model's tokenizer)")]
    mine = render(s.tok, prompt)
    if not template_source(t.tok):
        return [*out, Finding("warning", "chat template", f"the teacher '{t.name}' has no chat template (a Base "
                              "model?); it scores prompts in the student's format", "use an instruct teacher")]
    t_kwargs = {k: v for k, v in kwargs.items() if k in template_source(t.tok)}
    theirs = t.tok.apply_chat_template(list(prompt.messages), add_generation_prompt=True, tokenize=False, **t_kwargs)
    if mine == theirs:
        return [*out, Finding("ok", "chat template", "student and teacher render a prompt identically")]
    diff = "\n".join(difflib.unified_diff(mine.splitlines(), theirs.splitlines(), "student", "teacher", lineterm="",
                                          n=1))
    return [*out, Finding("warning", "chat template", "the teacher's own template renders a prompt differently "
                          "(it scores the student's rendering):\n" + diff,
                          "pick a teacher with the student's chat format, or set data.system_prompt / "
                          "data.chat_template_kwargs so the formats agree")]


def check_eos(s: _Model, t: _Model, stop_tokens: tuple[str, ...]) -> list[Finding]:
    try:
        student = set(stop_token_ids(s.tok, eos_token_ids(s.tok, s), stop_tokens))
    except ConfigError as exc:
        return [Finding("error", "end of answer", str(exc))]
    teacher = set(eos_token_ids(t.tok, t))
    missing, extra = sorted(teacher - student), sorted(student - teacher)
    out = []
    if missing:
        names = ", ".join(t.tok.convert_ids_to_tokens(i) for i in missing)
        out.append(Finding("error", "end of answer", f"the teacher ends answers with {', '.join(_token(t.tok, i) for i in missing)} "
                           f"but the student's sampler stops only at {', '.join(_token(s.tok, i) for i in sorted(student))}: "
                           "the teacher would teach the student to emit a token that does not end its samples",
                           f"--set rollout.stop_tokens=[{names}]"))
    if extra:
        out.append(Finding("warning", "end of answer", f"the student stops at {', '.join(_token(s.tok, i) for i in extra)}, "
                           "which the teacher does not treat as an end (a Base teacher?): its score of the last "
                           "token of every answer is off", "use an instruct teacher of the student's chat format"))
    if not out:
        out.append(Finding("ok", "end of answer", f"both end at {', '.join(_token(s.tok, i) for i in sorted(student))}"))
    pad = s.tok.pad_token_id
    out.append(Finding("ok", "padding", f"rows are padded with {_token(s.tok, pad)}, masked out everywhere"))
    bos_s, bos_t = s.tok("x")["input_ids"][:1], t.tok("x")["input_ids"][:1]
    if t.tok.bos_token_id is not None and bos_t == [t.tok.bos_token_id] and bos_s != bos_t:
        out.append(Finding("warning", "BOS", f"the teacher's tokenizer starts sequences with {t.tok.bos_token} "
                           "but the student's prompts do not (the teacher scores the student's ids)",
                           "add the BOS to the student's chat template"))
    return out


SAMPLING_KEYS = ("temperature", "top_p", "top_k")


def check_generation_config(s: _Model, rollout: Any) -> list[Finding]:
    if s.gen is None:
        return []
    suggested = {k: v for k, v in s.gen.to_diff_dict().items() if k in SAMPLING_KEYS}
    differ = {k: v for k, v in suggested.items() if getattr(rollout, k) != v}
    if not differ:
        return []
    return [Finding("warning", "generation_config", "the student's generation_config suggests "
                    + ", ".join(f"{k}={v}" for k, v in differ.items()) + "; the run samples with "
                    + ", ".join(f"rollout.{k}={getattr(rollout, k)}" for k in differ),
                    "on-policy distillation usually samples the student's own distribution (temperature 1); "
                    "set rollout.* to follow the model instead")]


def check_dtype(run: Any) -> list[Finding]:
    device = resolve_device(run.device)
    dtype = resolve_dtype(run.dtype, device)
    name = str(dtype).removeprefix("torch.")
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        return [Finding("error", "dtype", f"{torch.cuda.get_device_name(device)} has no bfloat16 support",
                        "--set run.dtype=float32 (or float16, with care for overflow)")]
    if device.type == "cpu" and dtype == torch.float16:
        return [Finding("warning", "dtype", "float16 on CPU is slow and loses precision",
                        "--set run.dtype=bfloat16 or float32")]
    if dtype != torch.float32 and not run.master_weights:
        return [Finding("warning", "dtype", f"the student trains its {name} weights themselves: AdamW updates below "
                        f"{name}'s spacing are lost (at lr 1e-6 most weights never move)",
                        "--set run.master_weights=true (float32 weights, mixed precision)")]
    mixed = ", the student in mixed precision (float32 weights)" if dtype != torch.float32 else ""
    return [Finding("ok", "dtype", f"{name} on {device}{mixed}")]


def check_positions(models: list[_Model], tok: Any, texts: list[tuple[str, str]], budget: int,
                    budget_key: str) -> list[Finding]:
    """Each (label, rendered text) plus `budget` new tokens against every model's context; a text
    too long to fit at any tokenisation (over 64 characters per position) is not tokenised."""
    limits = [(m, m.config.max_position_embeddings) for m in models
              if isinstance(getattr(m.config, "max_position_embeddings", None), int)]
    if not limits:
        return []
    model, limit = min(limits, key=lambda ml: ml[1])
    where = f"positions (max_position_embeddings of the {model.role} '{model.name}')"
    rough = [(label, len(text) // 64) for label, text in texts if len(text) // 64 + budget > limit]
    if rough:
        label, n = rough[0]
        return [Finding("error", "context", f"{label} has over {n} tokens; with {budget_key}={budget} that exceeds "
                        f"the model's context of {limit} {where}", "shorten or filter the prompts, or lower "
                        f"{budget_key}", kind=DataError)]
    lengths = [len(ids) for ids in tok([t for _, t in texts], add_special_tokens=False)["input_ids"]] if texts else []
    over = [(label, n) for (label, _), n in zip(texts, lengths, strict=True) if n + budget > limit]
    if over:
        label, n = over[0]
        more = f" ({len(over) - 1} more prompts too)" if len(over) > 1 else ""
        return [Finding("error", "context", f"{label} has {n} tokens; with {budget_key}={budget} that exceeds the "
                        f"model's context of {limit} {where}{more}", "shorten or filter the prompts, or lower "
                        f"{budget_key}", kind=DataError)]
    every = ", ".join(f"{m.role} {n}" for m, n in limits)
    return [Finding("ok", "context", f"longest of {len(texts)} prompts {max(lengths, default=0)} tokens + "
                    f"{budget} new tokens fits ({every} positions)")]


def _unique(prompts: list[Any]) -> list[Any]:
    """The stream's prompts once each (a small file repeats within the probe)."""
    seen: dict[str, Any] = {}
    for p in prompts:
        seen.setdefault(p.prompt_id, p)
    return list(seen.values())


def diagnose(cfg: Any) -> list[Finding]:
    """Every check for a train / rollout config (tokenizers and config files only)."""
    from opdcli.methods import build_method

    m = cfg.model
    trc = m.trust_remote_code
    student = _load("student", m.student, trc)
    out: list[Finding] = []
    prompts = PromptSource(cfg.data, cfg.run.seed).next_batch(PROBE_PROMPTS)
    held = heldout_prompts(cfg.data, cfg.eval.size) if cfg.eval.enabled else None
    served = cfg.scoring.teacher_engine != "hf" and cfg.vllm.teacher_url is not None
    models = [student]
    if served:
        out.append(Finding("ok", "teacher", f"served at {cfg.vllm.teacher_url}; the endpoint's tokenizer is "
                           "checked against the student's when the run connects"))
    else:
        models.append(_load("teacher", m.teacher, trc))
    domain = {name: tag for tag, name in sorted(m.teachers.items()) if name != m.teacher}  # one check per model
    teachers = models[1:] + [_load(f"teacher {tag}", name, trc) for name, tag in domain.items()]
    models = [student, *teachers]
    ref_name = build_method(cfg.method.name, cfg.method.options, cfg.loss).reference_model(m.student)
    if ref_name is not None and ref_name != m.student:
        models.append(_load("reference", ref_name, trc))
    try:
        probe = render(student.tok, prompts[0])
    except ConfigError as exc:
        return [*out, Finding("error", "chat template", str(exc))]
    for other in models[1:]:
        out += check_tokenizers(student, other, probe)
    if any(f.level == "error" for f in out):
        return out  # nothing else means anything across two vocabularies
    out += check_widths(models)
    for teacher in teachers:  # none when the teacher is served
        out += check_templates(student, teacher, prompts[0])
        out += check_eos(student, teacher, tuple(cfg.rollout.stop_tokens))
    out += check_generation_config(student, cfg.rollout)
    out += check_dtype(cfg.run)
    texts = [(f"prompt {i}", render(student.tok, p)) for i, p in enumerate(_unique(prompts))]
    texts += [(f"held-out prompt {i}", render(student.tok, p)) for i, p in enumerate(held or [])]
    budget, key = cfg.rollout.max_new_tokens, "rollout.max_new_tokens"
    if cfg.eval.enabled and (cfg.eval.max_new_tokens or 0) > budget:
        budget, key = cfg.eval.max_new_tokens, "eval.max_new_tokens"
    out += check_positions(models, student.tok, texts, budget, key)
    return out


def preflight(cfg: Any, report: bool = True) -> list[Finding]:
    """Run the doctor's checks at the start of a run: refuse the first error (one line, naming
    the fix), warn about the rest (on the reporting process only)."""
    findings = diagnose(cfg)
    errors = [f for f in findings if f.level == "error"]
    if errors:
        more = f" ({len(errors) - 1} more)" if len(errors) > 1 else ""
        raise errors[0].kind(errors[0].line().replace("\n", " ") + f"{more}; `opd doctor` shows every check")
    if report:
        for f in findings:
            if f.level == "warning":
                warnings.warn(f.line().splitlines()[0] + " (`opd doctor` shows the details)", stacklevel=2)
    return findings
