"""Load students, teachers and references, and check that they can be distilled together.

Models are hub names or local folders loaded with `AutoModelForCausalLM.from_pretrained`;
`toy:student` and `toy:teacher` name the toy models shipped inside the package. Device and dtype
come from the run config (`auto`: CUDA and bfloat16 where present, else CPU and float32).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from opdcli.config import ModelConfig
from opdcli.errors import ConfigError, ModelError
from opdcli.lm import set_vocab
from opdcli.lora import adapter_base, apply_lora, load_adapter, lora_config, merge_adapter
from opdcli.precision import mixed_precision, trains_mixed

TOY_WEIGHTS = Path(__file__).parent / "toy" / "weights"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_device(name: str) -> torch.device:
    """`auto` -> cuda if available, else cpu; anything else is validated."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"run.device '{name}' is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"run.device is '{name}' but CUDA is not available; set run.device=auto or cpu")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto` -> bfloat16 on CUDA, float32 elsewhere."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def resolve_model_path(name: str) -> str:
    """Map `toy:<name>` to the shipped folder; check local paths; pass hub ids through."""
    if name.startswith("toy:"):
        folder = TOY_WEIGHTS / name.split(":", 1)[1]
        if not (folder / "config.json").is_file():
            known = sorted(p.name for p in TOY_WEIGHTS.glob("*") if (p / "config.json").is_file())
            raise ModelError(
                f"toy model '{name}' not found in {TOY_WEIGHTS}; known: {', '.join(known) or 'none'}. "
                "Rebuild them with `opd toy build`"
            )
        return str(folder)
    path = Path(name).expanduser()
    if path.is_file() and path.name == "latest":  # a run's checkpoints/latest names its newest step
        path = path.parent / path.read_text(encoding="utf-8").strip()
    if path.exists():
        if (path / "adapter_config.json").is_file() and not (path / "config.json").is_file():
            return str(path)  # a LoRA adapter folder: load_model merges it into its base
        if not (path / "config.json").is_file():
            raise ModelError(
                f"model folder '{name}' has no config.json; pass a folder written by save_pretrained"
            )
        return str(path)
    if not _HUB_ID.match(name):
        raise ModelError(
            f"model path '{name}' does not exist; pass a local folder, a hub id such as "
            "Qwen/Qwen3-1.7B, or toy:student / toy:teacher"
        )
    return name


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model", "vocab.txt",
                   "spiece.model")
"""Any one of these makes a folder's tokenizer loadable."""


def load_tokenizer(name: str, trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    path = resolve_model_path(name)
    local = Path(path)
    if local.is_dir() and not any((local / f).is_file() for f in TOKENIZER_FILES):
        raise ModelError(f"model folder '{name}' has no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...); "
                         "save the tokenizer into it (tokenizer.save_pretrained) or copy them from the base model")
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load the tokenizer of '{name}': {_first_line(exc)}") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


def load_model(
    name: str, device: torch.device, dtype: torch.dtype, *, trust_remote_code: bool = False,
    attn_implementation: str = "sdpa", trainable: bool = False,
) -> Any:
    """Load a causal LM onto `device` in `dtype`; frozen and in eval mode unless trainable."""
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(name)
    adapter = None
    if (Path(path) / "adapter_config.json").is_file() and not (Path(path) / "config.json").is_file():
        adapter, path = Path(path), resolve_model_path(adapter_base(Path(path)))
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, trust_remote_code=trust_remote_code,
            attn_implementation=attn_implementation,
        )
        if adapter is not None:
            model = merge_adapter(model, adapter)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load model '{name}': {_first_line(exc)}") from None
    except SafetensorError as exc:
        raise ModelError(f"cannot load model '{name}': its weights file is damaged ({_first_line(exc)}); "
                         "save or download the model again") from None
    model.to(device)
    model.train(trainable)
    model.requires_grad_(trainable)
    return model


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


@dataclass(frozen=True)
class LoadedPair:
    """A student (trainable), a frozen teacher and the shared tokenizer."""

    student: Any
    teacher: Any
    tokenizer: Any
    device: torch.device
    dtype: torch.dtype


def check_same_vocabulary(tok_a: Any, tok_b: Any, name_a: str, name_b: str) -> None:
    """Refuse two models whose token ids mean different things."""
    if tok_a.get_vocab() != tok_b.get_vocab():
        raise ModelError(
            f"'{name_a}' and '{name_b}' have different vocabularies ({len(tok_a)} vs {len(tok_b)} "
            "tokens); token-level distillation needs one tokenizer: pick models from the same family"
        )


def check_head_covers(rows: int, tokens: int, name: str) -> None:
    """Refuse a model whose output head has fewer rows than its tokenizer has ids (a head
    padded past the tokenizer is fine: every model is scored over the tokenizer's ids only)."""
    if rows < tokens:
        raise ModelError(
            f"'{name}' has {rows} output logits but its tokenizer has {tokens} tokens; the checkpoint's head "
            "does not cover its tokenizer: use the tokenizer saved with these weights"
        )


def fit_vocab(model: Any, tokens: int, name: str) -> Any:
    """Check the model's head covers the tokenizer, and score it over the tokenizer's ids."""
    check_head_covers(int(model.get_output_embeddings().weight.shape[0]), tokens, name)
    set_vocab(model, tokens)
    return model


def load_pair(student: str, teacher: str, run_device: str, run_dtype: str, *,
              trust_remote_code: bool = False, attn_implementation: str = "sdpa",
              load_teacher: bool = True, teacher_files: bool = True,
              student_dtype: torch.dtype | None = None) -> LoadedPair:
    """Load and cross-check the student and teacher (tokenizers first, which is cheap).

    `load_teacher` false: the teacher runs in another engine (vLLM); its tokenizer and its
    config's vocabulary size are still checked against the student, its weights not loaded.
    `teacher_files` false too: the teacher is served elsewhere (an endpoint, which checks its own
    tokenizer against the student's); nothing of it is read here. `student_dtype`: the
    student's weights in another dtype than run_dtype's (float32 master weights)."""
    device = resolve_device(run_device)
    dtype = resolve_dtype(run_dtype, device)
    tok_s = load_tokenizer(student, trust_remote_code)
    if teacher_files:
        check_same_vocabulary(tok_s, load_tokenizer(teacher, trust_remote_code), student, teacher)
    kw = {"trust_remote_code": trust_remote_code, "attn_implementation": attn_implementation}
    s = fit_vocab(load_model(student, device, student_dtype or dtype, trainable=True, **kw), len(tok_s), student)
    if not teacher_files:
        return LoadedPair(student=s, teacher=None, tokenizer=tok_s, device=device, dtype=dtype)
    if not load_teacher:
        from transformers import AutoConfig

        t_cfg = AutoConfig.from_pretrained(resolve_model_path(teacher), trust_remote_code=trust_remote_code)
        check_head_covers(t_cfg.get_text_config().vocab_size, len(tok_s), teacher)
        return LoadedPair(student=s, teacher=None, tokenizer=tok_s, device=device, dtype=dtype)
    t = fit_vocab(load_model(teacher, device, dtype, trainable=False, **kw), len(tok_s), teacher)
    return LoadedPair(student=s, teacher=t, tokenizer=tok_s, device=device, dtype=dtype)


def load_configured_pair(m: ModelConfig, run_device: str, run_dtype: str, load_teacher: bool = True,
                         teacher_files: bool = True, master_weights: bool = False) -> LoadedPair:
    """load_pair with the model config's student, teacher and loading options. `master_weights`
    (a student that trains, run.master_weights): with a half-precision run_dtype the student
    trains in mixed precision (opdcli.precision), its full weights loaded in float32 (a LoRA
    student: its base stays in run_dtype, its adapters are float32)."""
    mixed = trains_mixed(resolve_dtype(run_dtype, resolve_device(run_device)), master_weights)
    pair = load_pair(m.student, m.teacher, run_device, run_dtype, trust_remote_code=m.trust_remote_code,
                     attn_implementation=m.attn_implementation, load_teacher=load_teacher,
                     teacher_files=teacher_files, student_dtype=torch.float32 if mixed and m.lora.r == 0 else None)
    prepare_student(pair.student, m)
    if mixed:
        mixed_precision(pair.student, pair.dtype)
    return pair


def prepare_student(student: Any, m: ModelConfig) -> Any:
    """The model config's training options on a loaded student: activation checkpointing, LoRA."""
    if m.gradient_checkpointing:
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if m.lora.r > 0:
        apply_lora(student, m.lora, resolve_model_path(m.student))
    return student


def load_reference(name: str | None, pair: LoadedPair, m: ModelConfig) -> Any:
    """The frozen reference model a method asks for (G-OPD), checked against the student."""
    if name is None:
        return None
    check_same_vocabulary(pair.tokenizer, load_tokenizer(name, m.trust_remote_code), m.student, name)
    ref = load_model(name, pair.device, pair.dtype, trust_remote_code=m.trust_remote_code,
                     attn_implementation=m.attn_implementation)
    return fit_vocab(ref, len(pair.tokenizer), name)


def load_teachers(pair: LoadedPair, m: ModelConfig) -> dict[str, Any]:
    """The domain teachers of model.teachers by tag, each checked against the student like the
    teacher, frozen, in the run's dtype; one that is model.teacher (or another tag's model) is
    the same loaded model, not a second copy."""
    teachers: dict[str, Any] = {}
    loaded = {m.teacher: pair.teacher} if pair.teacher is not None else {}
    for tag, name in m.teachers.items():
        if name in loaded:
            teachers[tag] = loaded[name]
            continue
        check_same_vocabulary(pair.tokenizer, load_tokenizer(name, m.trust_remote_code), m.student, name)
        model = load_model(name, pair.device, pair.dtype, trust_remote_code=m.trust_remote_code,
                           attn_implementation=m.attn_implementation)
        teachers[tag] = loaded[name] = fit_vocab(model, len(pair.tokenizer), name)
    return teachers


def load_weights(model: Any, folder: str | Path) -> None:
    """Copy a checkpoint folder's weights into `model` (resume), before any sharding; a LoRA
    student takes the checkpoint's adapter."""
    if lora_config(model) is not None:
        if not (Path(folder) / "adapter_model.safetensors").is_file():
            raise ModelError(f"{folder} holds no LoRA adapter but model.lora.r is set; resume with the "
                             "model.lora settings the run was started with")
        load_adapter(model, Path(folder))
        return
    if (Path(folder) / "adapter_model.safetensors").is_file():
        raise ModelError(f"{folder} holds a LoRA adapter; resume with the run's model.lora settings")
    loaded = load_model(str(folder), next(model.parameters()).device, next(model.parameters()).dtype)
    model.load_state_dict(loaded.state_dict())
