"""The record a rollout engine returns: prompts, sampled responses and behaviour log-probs."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RolloutBatch:
    """B = prompts x samples sequences: a left-padded prompt block of width P followed by a
    right-padded response block of width T.

    `behavior_lp_B_T[b, t]` is the log-prob under the sampler's own (tempered / truncated)
    distribution of `response_ids_B_T[b, t]`; `response_mask_B_T` is 1 on generated tokens,
    including the EOS token, and 0 on padding after it.
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

    @property
    def batch_size(self) -> int:
        return int(self.response_ids_B_T.shape[0])

    @property
    def response_len(self) -> int:
        return int(self.response_ids_B_T.shape[1])

    def rows(self, index_b: list[int] | slice) -> RolloutBatch:
        """A sub-batch of rows (prompt texts are kept whole; prompt_index_B still points in)."""
        idx = list(range(self.batch_size))[index_b] if isinstance(index_b, slice) else index_b
        t = torch.tensor(idx, dtype=torch.long, device=self.response_ids_B_T.device)
        return RolloutBatch(
            input_ids_B_L=self.input_ids_B_L[t],
            attention_mask_B_L=self.attention_mask_B_L[t],
            prompt_len=self.prompt_len,
            response_ids_B_T=self.response_ids_B_T[t],
            response_mask_B_T=self.response_mask_B_T[t],
            behavior_lp_B_T=self.behavior_lp_B_T[t],
            finished_B=self.finished_B[t],
            prompt_index_B=tuple(self.prompt_index_B[i] for i in idx),
            prompt_texts_P=self.prompt_texts_P,
        )
