"""LoRA students (`model.lora.r > 0`), with PEFT's own adapter layers.

The adapters are injected into the transformers model in place (`peft.inject_adapter_in_model`),
so the student keeps its class, body and head and every code path (scoring, the chunked
objectives, FSDP2) runs unchanged; only the adapter weights train. A checkpoint holds the
adapter in PEFT's format (`adapter_model.safetensors` + `adapter_config.json`, loadable with
`peft.PeftModel.from_pretrained(base, folder)` or by `opd eval --model folder`) and, with
`model.lora.merge`, the merged weights as a plain model folder in `merged/` (kept apart:
transformers applies an adapter it finds beside a model's weights).

Both savers work from a full state dict (one process's, or the one FSDP2 gathers), whose LoRA
keys look like `...q_proj.lora_A.default.weight` beside `...q_proj.base_layer.weight`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from opdcli.errors import ModelError

ADAPTER = "default"
LORA_ATTR = "opd_lora"


def apply_lora(model: Any, spec: Any, base_name: str) -> Any:
    """Inject LoRA adapters into `model` (in place) and train only them."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError:
        raise ModelError("model.lora needs the peft package: pip install 'opd[lora]' (or pip install peft), "
                         "or set model.lora.r=0 for full fine-tuning") from None
    config = LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
                        target_modules=list(spec.target_modules), task_type="CAUSAL_LM",
                        base_model_name_or_path=base_name)
    try:
        model = inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    except ValueError as exc:
        raise ModelError(f"model.lora.target_modules {list(spec.target_modules)} do not fit '{base_name}': "
                         f"{str(exc).splitlines()[0]}") from None
    for name, p in model.named_parameters():
        p.requires_grad_(".lora_" in name)
    setattr(model, LORA_ATTR, config)
    return model


def lora_config(model: Any) -> Any:
    """The LoRA config of a student made by apply_lora, or None."""
    return getattr(model, LORA_ATTR, None)


def _plain(key: str) -> str:
    return key.removeprefix("lm.")


def adapter_state(full: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The adapter weights under PEFT's saved names (base_model.model.<path>.lora_A.weight)."""
    return {"base_model.model." + _plain(k).replace(f".{ADAPTER}.", "."): v.detach().contiguous()
            for k, v in full.items() if ".lora_" in k}


def merged_state(full: dict[str, torch.Tensor], config: Any, tied: bool) -> dict[str, torch.Tensor]:
    """Plain transformers weights: every adapted W replaced by W + (alpha / r) B A."""
    scale = config.lora_alpha / config.r
    out: dict[str, torch.Tensor] = {}
    for key, value in full.items():
        key = _plain(key)
        if ".lora_" in key:
            continue
        if ".base_layer." in key:
            prefix, leaf = key.split(".base_layer.")
            if leaf == "weight":
                a = full.get(f"{prefix}.lora_A.{ADAPTER}.weight", full.get(f"lm.{prefix}.lora_A.{ADAPTER}.weight"))
                b = full.get(f"{prefix}.lora_B.{ADAPTER}.weight", full.get(f"lm.{prefix}.lora_B.{ADAPTER}.weight"))
                value = (value.float() + scale * (b.float() @ a.float())).to(value.dtype)
            key = f"{prefix}.{leaf}"
        out[key] = value.detach().contiguous()
    if tied:
        out.pop("lm_head.weight", None)
    return out


def save_lora(folder: Path, model: Any, full: dict[str, torch.Tensor] | None, merge: bool) -> None:
    """Write the adapter (and with `merge` the merged model) of a LoRA student into `folder`."""
    from safetensors.torch import save_file

    config = lora_config(model)
    full = full if full is not None else model.state_dict()
    folder.mkdir(parents=True, exist_ok=True)
    save_file(adapter_state(full), str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    blob = config.to_dict()
    blob["target_modules"] = sorted(blob["target_modules"]) if blob.get("target_modules") else None
    (folder / "adapter_config.json").write_text(json.dumps(blob, indent=2, default=str) + "\n", encoding="utf-8")
    if merge:  # a folder of its own: transformers would apply an adapter lying beside the weights again
        merged = folder / "merged"
        merged.mkdir()
        tied = bool(getattr(model.config, "tie_word_embeddings", False))
        save_file(merged_state(full, config, tied), str(merged / "model.safetensors"), metadata={"format": "pt"})
        model.config.save_pretrained(merged)
        if model.generation_config is not None:
            model.generation_config.save_pretrained(merged)


def load_adapter(model: Any, folder: Path) -> None:
    """Copy a checkpoint's adapter weights into a LoRA student (resume)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    state = {k.removeprefix("base_model.model."): v for k, v in load_file(str(folder / "adapter_model.safetensors")).items()}
    result = set_peft_model_state_dict(model, state, adapter_name=ADAPTER)
    missing = [k for k in getattr(result, "missing_keys", []) if ".lora_" in k]
    if missing:
        raise ModelError(f"{folder}: the adapter lacks {len(missing)} LoRA weights of this student (e.g. {missing[0]}); "
                         "resume with the model.lora settings the run was started with")


def adapter_base(folder: Path) -> str:
    """The base model an adapter folder was trained on (its adapter_config.json)."""
    config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    base = config.get("base_model_name_or_path")
    if not base:
        raise ModelError(f"{folder}/adapter_config.json names no base_model_name_or_path; add it")
    return str(base)


def merge_adapter(base_model: Any, folder: Path) -> Any:
    """`base_model` with the adapter of `folder` merged in: a plain model (evaluation)."""
    try:
        from peft import PeftModel
    except ImportError:
        raise ModelError(f"{folder} holds a LoRA adapter, which needs the peft package to load: "
                         "pip install 'opd[lora]'") from None
    return PeftModel.from_pretrained(base_model, str(folder)).merge_and_unload()
