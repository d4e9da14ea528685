"""Turn one step's scored batch into rollouts.jsonl records (schema: docs/rollouts-schema.md)."""

from __future__ import annotations

from typing import Any

import torch

from opdcli.grading import grade
from opdcli.records.io import RolloutWriter
from opdcli.records.schema import SCHEMA_NAME, SCHEMA_VERSION


def _row(x: torch.Tensor, n: int) -> list:
    return x[:n].tolist()


def _scalar(value: Any) -> Any:
    """Tensor / numpy scalars become plain python values for JSON."""
    return value.item() if isinstance(value, torch.Tensor) else value


def write_rollout_records(writer: RolloutWriter | None, run_id: str, step: int, prompts: list[Any],
                          rollout, scored, out, responses: list[str], method_name: str,
                          topk: int, with_lag: bool = False) -> int:
    """Append one record per sequence; returns the number written.

    `rollout` gives each row's prompt_index_B, prompt_texts_P and finished_B (a RolloutBatch
    or the global stages.StepRows); `scored` and `out` are the same rows' scores and method output.
    `with_lag` (asynchronous training) adds each row's version_lag; a method's per-row
    `freshness` output goes to the top-level field of the same name.
    """
    if writer is None:
        return 0
    lengths = scored.mask_B_T.sum(-1).long().tolist()
    for b, (n, text) in enumerate(zip(lengths, responses, strict=True)):
        prompt = prompts[rollout.prompt_index_B[b]]
        rec: dict[str, Any] = {
            "schema": SCHEMA_NAME, "schema_version": SCHEMA_VERSION, "run_id": run_id,
            "step": step, "policy_version": int(scored.version_B[b]),
            "sample_id": f"{step}-{b}", "prompt_id": prompt.prompt_id,
            "prompt": rollout.prompt_texts_P[rollout.prompt_index_B[b]],
            "response_text": text, "response_ids": _row(scored.response_ids_B_T[b], n),
            "mask": [1] * n, "student_lp": _row(scored.student_lp_B_T[b], n),
            "teacher_lp": _row(scored.teacher_lp_B_T[b], n), "behavior_lp": _row(scored.behavior_lp_B_T[b], n),
            "finished": bool(rollout.finished_B[b]),
            "answer": prompt.answer, "correct": None if prompt.answer is None else grade(text, prompt.answer),
        }
        if prompt.teacher is not None:
            rec["teacher"] = prompt.teacher
        if with_lag:
            rec["version_lag"] = max(0, step - int(scored.version_B[b]))
        if "freshness" in out.trajectory_outputs:
            rec["freshness"] = float(out.trajectory_outputs["freshness"][b])
        if scored.ref_lp_B_T is not None:
            rec["ref_lp"] = _row(scored.ref_lp_B_T[b], n)
        if topk > 0:
            rec["topk"] = topk
            rec["student_topk_ids"] = scored.student_topk_ids_B_T_K[b, :n, :topk].tolist()
            rec["student_topk_lp"] = scored.student_topk_lp_B_T_K[b, :n, :topk].tolist()
            rec["teacher_topk_ids"] = scored.teacher_topk_ids_B_T_K[b, :n, :topk].tolist()
            rec["teacher_topk_lp"] = scored.teacher_topk_lp_B_T_K[b, :n, :topk].tolist()
            if scored.teacher_lp_on_student_topk_B_T_K is not None:  # a vLLM teacher gives none
                rec["teacher_lp_on_student_topk"] = scored.teacher_lp_on_student_topk_B_T_K[b, :n, :topk].tolist()
            if scored.student_lp_on_teacher_topk_B_T_K is not None:  # scored for TOPD's union divergence
                rec["student_lp_on_teacher_topk"] = scored.student_lp_on_teacher_topk_B_T_K[b, :n, :topk].tolist()
        token = {"weight": _row(out.weights_B_T[b], n)}
        token |= {k: _row(v[b].float(), n) for k, v in out.token_outputs.items()}
        traj = {k: _scalar(v[b]) for k, v in out.trajectory_outputs.items()}
        rec["method"] = {"name": method_name, "token": token, "trajectory": traj}
        writer.write(rec)
    return len(lengths)
