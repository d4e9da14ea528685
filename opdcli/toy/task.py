"""The embedded toy world: multi-step integer arithmetic with a step-by-step solution.

A problem is an expression such as `14*2-12`. The solution applies every `*` first (left to
right), then `+`/`-` left to right, one step per sentence, and ends with the final answer in
`\\boxed{}`:

    Compute 14*2-12.   ->   14*2=28. 28-12=16. \\boxed{16}

Problems are a pure function of (seed, index), so the train stream and the held-out split are
reproducible; training skips every held-out question. `n_ops` and `max_operand` set the
difficulty; `n_ops` 6-10 gives the long-horizon variant (answers of 100+ tokens).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

HELDOUT_SEED_OFFSET = 1_000_003


@dataclass(frozen=True)
class ToyProblem:
    """One problem: the prompt, the gold step-by-step solution and the final answer."""

    question: str
    prompt: str
    solution: str
    answer: str


class ProblemStream:
    """The train stream and the held-out split of a task whose `sample(rng)` draws a problem."""

    def sample(self, rng: random.Random) -> ToyProblem:
        raise NotImplementedError

    def stream(self, seed: int, exclude: set[str] | None = None) -> Iterator[ToyProblem]:
        """Infinite stream of training problems, skipping questions in `exclude`."""
        rng = random.Random(seed)
        while True:
            problem = self.sample(rng)
            if exclude is None or problem.question not in exclude:
                yield problem

    def heldout(self, seed: int, size: int) -> list[ToyProblem]:
        """The held-out split: `size` distinct problems from a seed disjoint from training."""
        rng = random.Random(seed + HELDOUT_SEED_OFFSET)
        seen: dict[str, ToyProblem] = {}
        attempts = 0
        while len(seen) < size and attempts < size * 100:
            problem = self.sample(rng)
            seen.setdefault(problem.question, problem)
            attempts += 1
        return list(seen.values())


@dataclass(frozen=True)
class ToyTask(ProblemStream):
    """Difficulty knobs of the task."""

    n_ops: int = 2
    max_operand: int = 20
    ops: str = "+-*"

    def __post_init__(self) -> None:
        assert self.n_ops >= 1, "n_ops must be at least 1"
        assert self.max_operand >= 2, "max_operand must be at least 2"
        assert self.ops and set(self.ops) <= set("+-*"), "ops must be a subset of '+-*'"

    def sample(self, rng: random.Random) -> ToyProblem:
        ops = [rng.choice(self.ops) for _ in range(self.n_ops)]
        nums = [rng.randint(1, self.max_operand)]
        for op in ops:
            nums.append(rng.randint(2, 9) if op == "*" else rng.randint(1, self.max_operand))
        return solve(nums, ops)


def solve(nums: list[int], ops: list[str]) -> ToyProblem:
    """Build the question and the gold solution for operands `nums` and operators `ops`."""
    assert len(nums) == len(ops) + 1, "need one more operand than operators"
    question = "".join(f"{n}{op}" for n, op in zip(nums, ops, strict=False)) + str(nums[-1])
    steps: list[str] = []
    vals, pending = list(nums), list(ops)
    i = 0
    while i < len(pending):  # multiplications first, left to right
        if pending[i] == "*":
            result = vals[i] * vals[i + 1]
            steps.append(f"{vals[i]}*{vals[i + 1]}={result}.")
            vals[i : i + 2] = [result]
            pending.pop(i)
        else:
            i += 1
    acc = vals[0]
    for op, val in zip(pending, vals[1:], strict=True):
        result = acc + val if op == "+" else acc - val
        steps.append(f"{acc}{op}{val}={result}.")
        acc = result
    answer = str(acc)
    solution = " ".join(steps + [f"\\boxed{{{answer}}}"])
    return ToyProblem(question=question, prompt=f"Compute {question}.", solution=solution, answer=answer)
