"""The transformers scoring engine: per-token log-probs and top-K of the student, teacher and
reference on the student's tokens (alignment and chunking: `opdcli.lm`).

Every model is called through `ResponseLM.forward`, so a sharded (FSDP2) teacher or
reference works as well as a replicated one.
"""

from __future__ import annotations

import dataclasses

import torch

from opdcli.engines.types import RolloutBatch, ScoredBatch
from opdcli.errors import DataError
from opdcli.lm import as_response_lm, token_stats


class HFScorer:
    """Scores rollouts with transformers models (plain, wrapped in ResponseLM, or sharded).

    Args:
        student: the policy to score behaviour-free log-probs with (None: do not score it).
        teacher: the teacher.
        reference: the reference model of G-OPD, or None.
        k: top-K kept per token for both models.
        chunk_tokens: positions per chunk when applying the heads.
        batch_size: sequences per forward pass.
        student_on_teacher_topk: also score the student's log-probs of the teacher's top-K ids
            (TOPD's divergence on the union of both top-K sets): the student's head runs once
            more on its kept hidden states, its body does not.
        teachers: domain teachers by tag (model.teachers): a row whose prompt names a tag
            (`RolloutBatch.teacher_tags_B`) is scored by that teacher, any other by `teacher`.
        lockstep: the teachers are sharded over ranks (a forward is a collective), so every
            rank runs every teacher on every sub-batch, on one throw-away row where it has none.
    """

    def __init__(self, student, teacher, *, k: int, chunk_tokens: int, batch_size: int,
                 reference=None, student_on_teacher_topk: bool = False, teachers: dict | None = None,
                 lockstep: bool = False) -> None:
        self.lockstep = lockstep
        self.student = None if student is None else as_response_lm(student)
        self.teacher = None if teacher is None else as_response_lm(teacher)
        self.teachers = {tag: as_response_lm(m) for tag, m in (teachers or {}).items()}
        self.reference = None if reference is None else as_response_lm(reference)
        self.k, self.chunk_tokens, self.batch_size = k, chunk_tokens, batch_size
        self.student_on_teacher_topk = student_on_teacher_topk

    def _stats(self, model, batch: RolloutBatch, k: int, cand_ids_B_T_K=None, keep_hidden: bool = False,
               hidden_B_T_H: torch.Tensor | None = None):
        """Token stats of `model` on the batch; with `hidden_B_T_H` (states a follower already
        computed) only its head runs."""
        def compute(h, head):
            stats = token_stats(h, head, batch.response_ids_B_T, k, self.chunk_tokens, cand_ids_B_T_K)
            return stats, (h if keep_hidden else None)

        if hidden_B_T_H is not None:
            return model(hidden_B_T_H=hidden_B_T_H, compute=compute)
        return model(batch, compute=compute)

    def _teacher_stats(self, batch: RolloutBatch, k: int, cand_ids_B_T_K=None, keep_hidden: bool = False,
                       hidden_B_T_H: torch.Tensor | None = None):
        """`_stats` of each row's teacher: model.teacher, or the domain teacher its prompt names
        (rows grouped by teacher, one forward per group, results put back in row order)."""
        tags_B = batch.teacher_tags_B
        if not self.teachers or (not self.lockstep and all(t is None for t in tags_B)):
            return self._stats(self.teacher, batch, k, cand_ids_B_T_K, keep_hidden, hidden_B_T_H)
        assert not keep_hidden and hidden_B_T_H is None, "routed teachers keep no hidden states (validate refuses)"
        unknown = sorted({t for t in tags_B if t is not None} - set(self.teachers))
        if unknown:
            raise DataError(f"a prompt names teacher '{unknown[0]}' (its data.teacher_field), which model.teachers "
                            f"does not have (it has: {', '.join(sorted(self.teachers))}); add "
                            f"model.teachers.{unknown[0]}=<model> or fix the data")
        out: dict[str, torch.Tensor] = {}
        for tag in [None, *sorted(self.teachers)]:  # one order on every rank
            rows = [b for b, t in enumerate(tags_B) if t == tag]
            if not rows and not self.lockstep:
                continue
            model = self.teacher if tag is None else self.teachers[tag]
            pick = rows or [0]  # lockstep: a throw-away row keeps this rank in the collective
            idx = torch.tensor(pick, dtype=torch.long, device=batch.response_ids_B_T.device)
            cand = None if cand_ids_B_T_K is None else cand_ids_B_T_K[idx]
            stats = self._stats(model, batch.rows(pick), k, cand)[0]
            if not rows:
                continue
            for name, value in vars(stats).items():
                if isinstance(value, torch.Tensor):
                    if name not in out:
                        out[name] = value.new_zeros((batch.batch_size, *value.shape[1:]))
                    out[name][idx] = value
        return dataclasses.replace(stats, **out), None

    @torch.no_grad()
    def teacher_hidden(self, batch: RolloutBatch) -> torch.Tensor:
        """The teacher's final hidden states on the response positions, (B, T, H)."""
        assert not self.teachers, "routed teachers keep no hidden states (validate refuses)"
        return self.teacher(batch, compute=lambda h, head: h)

    @torch.no_grad()
    def teacher_logits(self, hidden_B_C_H: torch.Tensor) -> torch.Tensor:
        """The teacher's logits (float32) on kept hidden states."""
        assert not self.teachers, "routed teachers keep no hidden states (validate refuses)"
        return self.teacher(hidden_B_T_H=hidden_B_C_H, compute=lambda h, head: head(h).float())

    @torch.no_grad()
    def score(self, batch: RolloutBatch, *, keep_teacher_hidden: bool = False,
              with_student: bool = True) -> ScoredBatch:
        """Score the student's samples with student, teacher (and reference), no grad.

        `with_student` false skips the student (its statistics then come from the training
        forward, `opdcli.objective.StudentStats`): its fields hold NaN log-probs and -1 ids
        until `fill_student` replaces them, and the teacher's log-probs on the student's top-K
        are left for the training forward too. A rollout that carries the teacher's hidden
        states (a stop rule's follower ran the teacher along generation) is not run through
        the teacher's body again.
        """
        assert batch.version_B is not None, "the sampler stamps every row with its policy version"
        pieces: dict[str, list[torch.Tensor]] = {}
        cross = with_student and self.student_on_teacher_topk
        for a in range(0, batch.batch_size, self.batch_size):
            sub = batch.rows(slice(a, a + self.batch_size))
            if with_student:
                s, h_s = self._stats(self.student, sub, self.k, keep_hidden=cross)
                got = {"s_lp": s.lp_B_T, "s_ids": s.topk_ids_B_T_K, "s_top": s.topk_lp_B_T_K}
            else:
                got = _unscored(sub.response_ids_B_T, self.k)
            t, h_t = self._teacher_stats(sub, self.k, got["s_ids"] if with_student else None,
                                         keep_teacher_hidden, sub.teacher_hidden_B_T_H)
            got |= {"t_lp": t.lp_B_T, "t_ids": t.topk_ids_B_T_K, "t_top": t.topk_lp_B_T_K}
            if cross:
                got["s_on_t"] = self._stats(self.student, sub, 1, t.topk_ids_B_T_K, hidden_B_T_H=h_s)[0].cand_lp_B_T_K
            if t.cand_lp_B_T_K is not None:
                got["t_on_s"] = t.cand_lp_B_T_K
            if h_t is not None:
                got["t_h"] = h_t
            if self.reference is not None:
                got["r_lp"] = self._stats(self.reference, sub, 1)[0].lp_B_T
            for key, value in got.items():
                pieces.setdefault(key, []).append(value)
        cat = {key: torch.cat(v, 0) for key, v in pieces.items()}
        mask = batch.response_mask_B_T.float()
        return ScoredBatch(
            response_ids_B_T=batch.response_ids_B_T, mask_B_T=mask, behavior_lp_B_T=batch.behavior_lp_B_T,
            student_lp_B_T=cat["s_lp"], teacher_lp_B_T=cat["t_lp"], student_topk_ids_B_T_K=cat["s_ids"],
            student_topk_lp_B_T_K=cat["s_top"], teacher_topk_ids_B_T_K=cat["t_ids"],
            teacher_topk_lp_B_T_K=cat["t_top"], teacher_lp_on_student_topk_B_T_K=cat.get("t_on_s"),
            version_B=batch.version_B.clone(), ref_lp_B_T=cat.get("r_lp"), teacher_hidden_B_T_H=cat.get("t_h"),
            stored_teacher_lp_B_T=batch.teacher_lp_B_T, student_lp_on_teacher_topk_B_T_K=cat.get("s_on_t"),
        )

    @torch.no_grad()
    def teacher_token_lp(self, batch: RolloutBatch) -> torch.Tensor:
        """The teacher's log-probs of the sampled tokens only, (B, T) (a rollout worker's scoring)."""
        subs = [batch.rows(slice(a, a + self.batch_size)) for a in range(0, batch.batch_size, self.batch_size)]
        parts = [self._teacher_stats(sub, 1, hidden_B_T_H=sub.teacher_hidden_B_T_H)[0].lp_B_T for sub in subs]
        return torch.cat(parts, 0)


def _unscored(ids_B_T: torch.Tensor, k: int) -> dict[str, torch.Tensor]:
    """Placeholders for student statistics still to come (NaN log-probs, -1 ids)."""
    B, T = ids_B_T.shape
    nan = torch.full((B, T), float("nan"), device=ids_B_T.device)
    return {"s_lp": nan, "s_ids": torch.full((B, T, k), -1, dtype=torch.long, device=ids_B_T.device),
            "s_top": nan[..., None].expand(B, T, k).clone()}


def score_rollouts(student, teacher, batch: RolloutBatch, *, k: int, chunk_tokens: int, batch_size: int,
                   reference=None, keep_teacher_hidden: bool = False) -> ScoredBatch:
    """One-shot scoring with an HFScorer (see there)."""
    scorer = HFScorer(student, teacher, k=k, chunk_tokens=chunk_tokens, batch_size=batch_size,
                      reference=reference)
    return scorer.score(batch, keep_teacher_hidden=keep_teacher_hidden)
