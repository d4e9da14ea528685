"""Where a forms-world model's answers go wrong, step by step.

    python -m benchmarks.forms_steps toy:teacher-forms toy:student-forms --n 128
    python -m benchmarks.forms_steps /tmp/w/teacher-forms-8 --n-ops 8 --temperature 1.0

Decodes `--n` held-out problems of the forms world (`data.toy.world: forms`, the same split
training evaluates on) and reads each answer sentence by sentence (`opdcli.toy.forms.read_steps`):
the share of steps whose arithmetic is right, the share that take the question's next operation
on the value they carry (the pointer), the median first wrong step, the forms of the late steps (after the
always-symbolic first `canonical_steps`) and the answers' accuracy. Prints one row per model and writes forms_steps.csv (and the per-step rows,
forms_steps_by_index.csv: accuracy of each step index, the curve a plot of drift would use)
under --out.
"""

from __future__ import annotations

import argparse
import csv
import statistics
from pathlib import Path

import torch

from opdcli.config import DataConfig, ToyTaskConfig
from opdcli.data import heldout_prompts, render
from opdcli.engines.hf_sampler import HFSampler, decode_responses
from opdcli.engines.types import SamplingParams
from opdcli.grading import grade
from opdcli.models import load_model, load_tokenizer, resolve_device, resolve_dtype
from opdcli.toy.forms import FORMS, question_of, read_steps


def read_model(name: str, data: DataConfig, n: int, temperature: float, max_new_tokens: int, seed: int,
               device: torch.device, dtype: torch.dtype) -> tuple[dict, list[dict]]:
    """The summary row and the per-index rows of one model."""
    tok = load_tokenizer(name)
    model = load_model(name, device, dtype)
    prompts = heldout_prompts(data, n)
    generator = torch.Generator(device=device).manual_seed(seed) if temperature > 0 else None
    params = SamplingParams(n=1, temperature=temperature, max_new_tokens=max_new_tokens, batch_size=64)
    batch = HFSampler(model, tok, generator=generator).sample([render(tok, p) for p in prompts], params)
    answers = decode_responses(tok, batch)
    steps, first_wrong, by_index = [], [], {}
    for prompt, answer in zip(prompts, answers, strict=True):
        read = read_steps(question_of(prompt.messages[-1]["content"]), answer)
        steps += read
        wrong = [s.index for s in read if not (s.arithmetic_right and s.operand_right)]
        first_wrong.append(wrong[0] if wrong else len(read))
        for s in read:
            by_index.setdefault(s.index, []).append(s.arithmetic_right and s.operand_right)
    total = max(1, len(steps))
    late = [s for s in steps if s.index >= data.toy.canonical_steps]  # the steps whose form is free
    row = {
        "model": name, "answers": len(answers), "temperature": temperature,
        "accuracy": sum(grade(a, p.answer or "") for a, p in zip(answers, prompts, strict=True)) / len(answers),
        "steps_read": len(steps),
        "arithmetic_right": sum(s.arithmetic_right for s in steps) / total,
        "operand_right": sum(s.operand_right for s in steps) / total,
        "median_first_wrong_step": statistics.median(first_wrong),
        "not_a_step": sum(s.form is None for s in steps) / total,
        **{f"late_form_{f}": sum(s.form == f for s in late) / max(1, len(late)) for f in FORMS},
    }
    curve = [{"model": name, "step_index": i, "answers": len(v), "step_right": sum(v) / len(v)}
             for i, v in sorted(by_index.items())]
    return row, curve


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="+", help="toy:<name> or a model folder")
    ap.add_argument("--n", type=int, default=128, help="held-out problems (default 128)")
    ap.add_argument("--n-ops", type=int, default=16, help="data.toy.n_ops of the problems (default 16)")
    ap.add_argument("--max-operand", type=int, default=49)
    ap.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    ap.add_argument("--max-new-tokens", type=int, default=320)
    ap.add_argument("--seed", type=int, default=0, help="noise seed of sampled answers")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--out", type=Path, default=Path("forms_steps"))
    args = ap.parse_args(argv)
    data = DataConfig(source="toy", toy=ToyTaskConfig(world="forms", n_ops=args.n_ops, max_operand=args.max_operand,
                                                      heldout_size=args.n))
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    rows, curves = [], []
    for name in args.models:
        row, curve = read_model(name, data, args.n, args.temperature, args.max_new_tokens, args.seed, device, dtype)
        rows.append(row)
        curves += curve
        print(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    for path, table in ((args.out / "forms_steps.csv", rows), (args.out / "forms_steps_by_index.csv", curves)):
        with path.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(table[0]) if table else ["model"])
            writer.writeheader()
            writer.writerows(table)
    print(f"wrote {args.out / 'forms_steps.csv'} and {args.out / 'forms_steps_by_index.csv'}")


if __name__ == "__main__":
    main()
