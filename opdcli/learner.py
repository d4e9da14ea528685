"""The trainable student: its ResponseLM (sharded with FSDP2 under torchrun), the optimizer,
the optimizer step and the full weights / optimizer state that checkpoints and engines need.

Sharding: `fully_shard` on every decoder layer, then on the ResponseLM wrapper (embeddings,
final norm and head). Alone the model is not wrapped at all. State dicts go through torch's
distributed-checkpoint helpers with `full_state_dict=True`, so a checkpoint written by N ranks
is a plain `save_pretrained` folder and resumes on any number of ranks.
"""

from __future__ import annotations

from typing import Any

import torch

from opdcli.config import OptimConfig
from opdcli.dist import Dist
from opdcli.errors import CheckpointError, ModelError
from opdcli.lm import ResponseLM
from opdcli.optim import build_optimizer, optimizer_step
from opdcli.precision import replica_weights


def decoder_layers(lm: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder layers of a transformers causal LM (model.base_model.layers)."""
    layers = getattr(lm.base_model, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise ModelError(f"cannot shard {type(lm).__name__}: it has no base_model.layers list of decoder "
                         "layers; run it on one process")
    return layers


def shard(module: ResponseLM) -> ResponseLM:
    """FSDP2: one unit per decoder layer, the wrapper (embeddings, norm, head) as the root."""
    from torch.distributed.fsdp import fully_shard

    for layer in decoder_layers(module.lm):
        fully_shard(layer)
    fully_shard(module)
    return module


def _strip(state: dict[str, Any]) -> dict[str, Any]:
    return {k.removeprefix("lm."): v for k, v in state.items()}


class Learner:
    """The student with grad, on one process or data-parallel over `d`."""

    def __init__(self, student: torch.nn.Module, optim: OptimConfig, d: Dist) -> None:
        self.d = d
        # checkpoint keys: one name per tensor (a tied head is saved once, as save_pretrained does)
        self._saved = {n for n, _ in student.named_parameters()} | {n for n, _ in student.named_buffers()}
        self.module = ResponseLM(student)
        if d.active:
            shard(self.module)
        self.optimizer = build_optimizer(self.module, optim)

    def step(self, cfg: OptimConfig, step: int, max_steps: int) -> dict[str, float]:
        return optimizer_step(self.module, self.optimizer, cfg, step, max_steps)

    def replica_state(self) -> dict[str, torch.Tensor]:
        """The full weights in the dtype sampling replicas and engines hold (gathered from every
        rank under torchrun: a collective)."""
        if self.d.active:
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                get_model_state_dict,
            )

            state = _strip(get_model_state_dict(self.module, options=StateDictOptions(full_state_dict=True)))
        else:
            state = self.module.lm.state_dict()
        return replica_weights(self.module.lm, state)

    def full_weights(self) -> dict[str, torch.Tensor] | None:
        """`replica_state` on every rank under torchrun; None alone, where engines share the module."""
        return self.replica_state() if self.d.active else None

    def checkpoint_state(self) -> tuple[dict[str, torch.Tensor] | None, dict[str, Any]]:
        """(full weights or None alone, full optimizer state), complete on rank 0; a collective."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        weights = None
        if self.d.active:
            weights = {k: v for k, v in _strip(get_model_state_dict(self.module, options=opts)).items()
                       if k in self._saved}
        return weights, get_optimizer_state_dict(self.module, self.optimizer, options=opts)

    def load_optimizer_state(self, state: dict[str, Any]) -> None:
        """Restore an optimizer state written by `checkpoint_state` (any number of ranks)."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_optimizer_state_dict,
        )

        if state.get("state") and isinstance(next(iter(state["state"])), int):  # a plain state_dict()
            if self.d.active:
                raise CheckpointError("this checkpoint's optimizer state predates data-parallel checkpoints; "
                                      "resume it on one process")
            self.optimizer.load_state_dict(state)
            return
        set_optimizer_state_dict(self.module, self.optimizer, optim_state_dict=state,
                                 options=StateDictOptions(full_state_dict=True))
