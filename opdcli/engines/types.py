"""The records that cross stage and engine boundaries, and the engine interfaces.

`RolloutBatch` is what a `Sampler` returns (prompts, sampled responses, behaviour log-probs and
the policy version of every row); `ScoredBatch` is what a `Scorer` returns (per-token
log-probs and top-K of student, teacher and reference on those tokens). Both are frozen and
carry shape suffixes: B sequences, P prompt width, T response width, K top-K, H hidden size.

A method steers generation only through a `GenerationControl` value (a token budget and an
optional `StopRule`), which the sampler consults; it never sees the sampler or the models.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Protocol

import torch

# ------------------------------------------------------------------------------ sampling


@dataclass(frozen=True)
class SamplingParams:
    n: int = 1
    """Samples per prompt."""
    temperature: float = 1.0
    """0 means greedy."""
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 256
    batch_size: int = 64
    """Sequences decoded at once."""
    stop_tokens: tuple[str, ...] = ()
    """Tokens (as strings) that end a response besides the policy's EOS ids."""


class StopState(Protocol):
    """Per-block state of a stop rule: fed one chunk of tokens and the teacher's logits."""

    stopped_B: torch.Tensor

    def update(self, tok_B_C: torch.Tensor, student_topk_ids_B_C_K: torch.Tensor | None,
               teacher_logits_B_C_V: torch.Tensor, valid_B_C: torch.Tensor) -> torch.Tensor:
        """Rows (bool B) that stop after this chunk."""
        ...


class StopRule(Protocol):
    """A per-token stop decision that needs the teacher following generation (Prune online).

    The engine runs the teacher along the sampled tokens in chunks of `chunk` positions and
    hands each chunk's logits to the state; `student_topk` is the number of student top-K
    ids per token the rule reads (0: none).
    """

    chunk: int
    student_topk: int

    def open(self, rows: int, device: torch.device) -> StopState: ...


@dataclass(frozen=True)
class GenerationControl:
    """What a method decides about one step's generation."""

    max_new_tokens: int
    stop: StopRule | None = None


@dataclass(frozen=True)
class RowShard:
    """This process samples global rows [start, stop) of a batch of `total` rows.

    `reduce_max` combines an integer over the processes of the batch (identity alone); the
    HF sampler uses it so that every process draws the same random stream as one process
    sampling the whole batch would.
    """

    start: int
    stop: int
    total: int
    reduce_max: Any = None

    @staticmethod
    def whole(total: int) -> RowShard:
        return RowShard(0, total, total)


# ------------------------------------------------------------------------------- records


@dataclass(frozen=True)
class RolloutBatch:
    """B sequences: a left-padded prompt block of width P followed by a right-padded response
    block of width T.

    `behavior_lp_B_T[b, t]` is the log-prob under the sampler's own (tempered / truncated)
    distribution of `response_ids_B_T[b, t]`; `response_mask_B_T` is 1 on generated tokens,
    including the EOS token, and 0 on padding after it. `version_B` is the policy version of
    the weights that sampled each row, stamped by the sampler. `stopped_B` marks rows ended by
    a stop rule; `follower_tokens` counts the teacher tokens scored during sampling.
    `teacher_lp_B_T` holds the teacher's log-probs of the sampled tokens when the rollout
    worker scored them itself (asynchronous.worker_scoring), else None. `teacher_hidden_B_T_H`
    holds the teacher's final hidden state before each response token when a stop rule's
    follower already ran the teacher along generation (zeros past a row's end), else None:
    the scorer then applies only the teacher's head.
    """

    input_ids_B_L: torch.Tensor
    attention_mask_B_L: torch.Tensor
    prompt_len: int
    response_ids_B_T: torch.Tensor
    response_mask_B_T: torch.Tensor
    behavior_lp_B_T: torch.Tensor
    finished_B: torch.Tensor
    prompt_index_B: tuple[int, ...]
    prompt_texts_P: tuple[str, ...]
    version_B: torch.Tensor | None = None
    stopped_B: torch.Tensor | None = None
    follower_tokens: int = 0
    teacher_lp_B_T: torch.Tensor | None = None
    teacher_hidden_B_T_H: torch.Tensor | None = None
    prompt_teachers_P: tuple[str | None, ...] = ()
    """The model.teachers tag of each prompt (None: model.teacher); () when no prompt has one."""

    @property
    def teacher_tags_B(self) -> tuple[str | None, ...]:
        """Each row's teacher tag (all None without multi-teacher routing)."""
        if not self.prompt_teachers_P:
            return (None,) * self.batch_size
        return tuple(self.prompt_teachers_P[i] for i in self.prompt_index_B)

    @property
    def batch_size(self) -> int:
        return int(self.response_ids_B_T.shape[0])

    @property
    def response_len(self) -> int:
        return int(self.response_ids_B_T.shape[1])

    def to(self, device: torch.device | str) -> RolloutBatch:
        """The same batch with every tensor on `device` (e.g. a rollout worker's CPU batch)."""
        return dataclasses.replace(self, **{f.name: getattr(self, f.name).to(device)
                                            for f in dataclasses.fields(self)
                                            if isinstance(getattr(self, f.name), torch.Tensor)})

    def rows(self, index_b: list[int] | slice) -> RolloutBatch:
        """A sub-batch of rows (prompt texts are kept whole; prompt_index_B still points in)."""
        idx = list(range(self.batch_size))[index_b] if isinstance(index_b, slice) else index_b
        t = torch.tensor(idx, dtype=torch.long, device=self.response_ids_B_T.device)

        def pick(x: torch.Tensor | None) -> torch.Tensor | None:
            return None if x is None else x[t.to(x.device)]

        return dataclasses.replace(
            self, input_ids_B_L=self.input_ids_B_L[t], attention_mask_B_L=self.attention_mask_B_L[t],
            response_ids_B_T=self.response_ids_B_T[t], response_mask_B_T=self.response_mask_B_T[t],
            behavior_lp_B_T=self.behavior_lp_B_T[t], finished_B=self.finished_B[t],
            prompt_index_B=tuple(self.prompt_index_B[i] for i in idx),
            version_B=pick(self.version_B), stopped_B=pick(self.stopped_B), teacher_lp_B_T=pick(self.teacher_lp_B_T),
            teacher_hidden_B_T_H=pick(self.teacher_hidden_B_T_H))


@dataclass(frozen=True)
class ScoredBatch:
    """The per-token record every later stage reads (methods.md §7). All tensors detached.

    Shapes: B sequences, T response positions, K top-K. `teacher_lp_on_student_topk_B_T_K`
    holds the teacher's log-probs of the student's top-K ids. `version_B` is the policy
    version that sampled each row (copied from the rollout). `stored_teacher_lp_B_T` is the
    rollout worker's own teacher scoring of the same tokens, when it did one (f-OPD compares
    the advantage it implies with the fresh one: supervision drift).
    """

    response_ids_B_T: torch.Tensor
    mask_B_T: torch.Tensor
    behavior_lp_B_T: torch.Tensor
    student_lp_B_T: torch.Tensor
    teacher_lp_B_T: torch.Tensor
    student_topk_ids_B_T_K: torch.Tensor
    student_topk_lp_B_T_K: torch.Tensor
    teacher_topk_ids_B_T_K: torch.Tensor
    teacher_topk_lp_B_T_K: torch.Tensor
    teacher_lp_on_student_topk_B_T_K: torch.Tensor | None
    """None where the teacher engine cannot score arbitrary ids (vLLM: scoring.teacher_engine)."""
    version_B: torch.Tensor
    ref_lp_B_T: torch.Tensor | None = None
    stored_teacher_lp_B_T: torch.Tensor | None = None
    teacher_hidden_B_T_H: torch.Tensor | None = None
    """Kept only for full-distribution objectives, which need the teacher's logits again
    (through `Scorer.teacher_logits`)."""
    student_lp_on_teacher_topk_B_T_K: torch.Tensor | None = None
    """The student's log-probs of the teacher's top-K ids; scored only for a method that
    declares `reads_student_on_teacher_topk` (TOPD's union divergence)."""

    @property
    def num_tokens(self) -> int:
        return int(self.mask_B_T.sum().item())

    def rows(self, sl: slice) -> ScoredBatch:
        """The same record restricted to rows `sl` (every field is indexed on dim 0)."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return ScoredBatch(**{k: None if v is None else v[sl] for k, v in values.items()})


# ----------------------------------------------------------------------------- engines


class Sampler(Protocol):
    """Samples responses from the current policy.

    `supports_stop_rules` says up front whether the engine can host a per-token `StopRule`
    (an engine that cannot is refused at config time, before any model loads).
    """

    name: str
    supports_stop_rules: bool
    version: int

    def sample(self, prompt_texts_P: list[str], params: SamplingParams, *,
               control: GenerationControl | None = None, shard: RowShard | None = None) -> RolloutBatch:
        ...

    def sync_weights(self, state: dict[str, torch.Tensor] | None, version: int) -> None:
        """Take new policy weights (None: the engine shares the learner's module) and version."""
        ...


class Scorer(Protocol):
    """Scores a rollout: per-token log-probs and top-K of student, teacher and reference."""

    def score(self, rollout: RolloutBatch, *, keep_teacher_hidden: bool = False) -> ScoredBatch: ...

    def teacher_logits(self, hidden_B_C_H: torch.Tensor) -> torch.Tensor:
        """The teacher's logits on kept hidden states (full-distribution objectives)."""
        ...
