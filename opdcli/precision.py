"""Mixed precision for the trained student: float32 weights, forwards in run.dtype.

AdamW on bfloat16 weights loses every update smaller than half a unit in the last place: a
weight of 0.02 moves in steps of 1.2e-4, so at lr 1e-6 the update rounds to nothing and the
student does not learn (measured on the toy student: one step at lr 1e-6 changes 1% of the
bfloat16 weights and 100% of the float32 ones). So when run.dtype is bfloat16 or float16 and
run.master_weights is on (the default), the student's trainable parameters, their gradients, the
optimizer state and the checkpoints stay float32, and every forward of the student runs under
`torch.autocast(run.dtype)`: the same arithmetic the field's trainers use (HF Trainer / TRL
with bf16=True, FSDP mixed precision with float32 parameters). The teacher and any frozen
reference stay in run.dtype.

The autocast region is entered by forward hooks on the student, on its body and on its output
head (the scorer and the objectives call the body and then the head chunk by chunk), so the
sampler, the scorer, the training forward and the evaluation all run it without knowing. A
region is not entered again when one is open: the sampler opens one for a whole decode
(`autocast_region`), and autocast's cache then casts the float32 weights once per rollout, not
once per token.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Any

import torch

from opdcli.lm import AUTOCAST_ATTR, unwrap

HALF = (torch.bfloat16, torch.float16)


class _AutocastHooks:
    """A forward pre-hook and forward hook pair that open and close one autocast region."""

    def __init__(self, device_type: str, dtype: torch.dtype) -> None:
        self.device_type, self.dtype = device_type, dtype
        self.open: list[Any] = []

    def enter(self, module, args) -> None:
        if torch.is_autocast_enabled(self.device_type):  # an outer region (the sampler's) is open
            self.open.append(None)
            return
        region = torch.autocast(self.device_type, dtype=self.dtype)
        region.__enter__()
        self.open.append(region)

    def exit(self, module, args, output) -> None:
        region = self.open.pop() if self.open else None
        if region is not None:
            region.__exit__(None, None, None)


def mixed_precision(student: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Make `student` train in mixed precision: its trainable parameters float32 (frozen ones,
    a LoRA base, stay as they are) and its forwards under autocast to `dtype`."""
    for p in student.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    device_type = next(student.parameters()).device.type
    hooks = _AutocastHooks(device_type, dtype)
    for module in {id(m): m for m in (student, student.base_model, student.get_output_embeddings())}.values():
        module.register_forward_pre_hook(hooks.enter)
        module.register_forward_hook(hooks.exit, always_call=True)
        setattr(module, AUTOCAST_ATTR, dtype)
    return student


def compute_dtype(model: Any) -> torch.dtype | None:
    """The autocast dtype of a mixed-precision student (None for any other model)."""
    return getattr(unwrap(model), AUTOCAST_ATTR, None)


def autocast_region(model: Any) -> contextlib.AbstractContextManager:
    """One autocast region around many forwards of a mixed-precision student (a decode loop);
    a no-op for any other model."""
    dtype = compute_dtype(model)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(next(model.parameters()).device.type, dtype=dtype)


def sampling_replica(student: torch.nn.Module) -> torch.nn.Module:
    """A frozen full copy of the student for a sampler (before the learner shards it); a
    mixed-precision student's copy holds its weights in the compute dtype (half the memory)."""
    replica = copy.deepcopy(student).requires_grad_(False).eval()
    dtype = compute_dtype(replica)
    return replica if dtype is None else replica.to(dtype)


def replica_weights(model: Any, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` as replicas and engines hold it: a mixed-precision student's float32 tensors cast
    to its compute dtype (the same rounding the receiver's copy would do, done once before the
    transfer, so that Ray, NCCL and vLLM pushes move half the bytes); unchanged for any other
    model."""
    dtype = compute_dtype(model)
    if dtype is None:
        return state
    return {k: v.to(dtype) if v.dtype == torch.float32 else v for k, v in state.items()}


def trains_mixed(dtype: torch.dtype, master_weights: bool) -> bool:
    """Whether a student trained in `dtype` keeps float32 weights (run.master_weights)."""
    return master_weights and dtype in HALF
