"""The second toy world ("forms"): long chained arithmetic written in several surface forms.

A problem starts with one multiplication (the early step that decides everything after it)
and continues with `n_ops` routine additions and subtractions of the running value:

    Compute 23*7+15-9+31-4.
    23*7=161. 161+15=176. Then 176 - 9 = 167. 167 plus 31 is 198. Next, 198 = ...  \\boxed{194}

Every step can be written in three equivalent forms, the same arithmetic in other words:

    symbolic       a+b=c.
    result-first   c = a + b.
    words          a plus b is c.

and a late step may open with a connective ("Then ", "Next, ", "Now ", "So "). The first
`canonical_steps` steps are always symbolic and bare, so the early, decisive part of an answer
has one surface form and the late, routine part has several: a teacher is confident early and
spreads its mass over forms late, and two models can disagree in form without disagreeing in
the arithmetic. A *style* is the mixture of forms and the connective rate a model is trained
on (`STYLES`); a pair trained on the same style is compatible, a teacher that never saw one of
the student's forms is not (its prefix drifts once the student writes that form).

Problems are a pure function of (seed, index), like the first toy world (`opdcli.toy.task`):
the held-out split comes from a disjoint seed and training skips its questions; the split
depends on the seed and the arithmetic knobs only, so every style shares it. The gold
solution of a problem is drawn in the configured style with a generator seeded by the
problem, so it is reproducible too.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from opdcli.toy.task import ProblemStream, ToyProblem

FORMS = ("symbolic", "result_first", "words")
WORDS = {"+": "plus", "-": "minus", "*": "times"}
CONNECTIVES = ("Then ", "Next, ", "Now ", "So ")


@dataclass(frozen=True)
class Style:
    """Probabilities of the three forms (late steps) and of a connective before a late step."""

    forms: tuple[float, float, float]
    connective: float


STYLES = {
    # every form equally often: the compatible pair's style
    "even": Style((1 / 3, 1 / 3, 1 / 3), 0.5),
    # never the words form: a teacher on this style drifts where an "even" student writes words
    "symbolic": Style((0.6, 0.4, 0.0), 0.3),
    # mostly words
    "words": Style((0.1, 0.1, 0.8), 0.5),
}
MAX_VALUE = 999


def write_step(a: int, op: str, b: int, c: int, form: str, connective: str = "") -> str:
    """One step `a op b = c` in one of the three forms."""
    if form == "symbolic":
        body = f"{a}{op}{b}={c}."
    elif form == "result_first":
        body = f"{c} = {a} {op} {b}."
    else:
        body = f"{a} {WORDS[op]} {b} is {c}."
    return connective + body


@dataclass(frozen=True)
class FormsTask(ProblemStream):
    """The forms world's problems: one multiplication, then `n_ops` additions / subtractions."""

    n_ops: int = 20
    max_operand: int = 49
    style: str = "even"
    canonical_steps: int = 2

    def __post_init__(self) -> None:
        assert self.n_ops >= 1, "n_ops must be at least 1"
        assert self.max_operand >= 2, "max_operand must be at least 2"
        assert self.style in STYLES, f"style must be one of {', '.join(STYLES)}"
        assert self.canonical_steps >= 0, "canonical_steps must be >= 0"

    def sample(self, rng: random.Random) -> ToyProblem:
        a, b = rng.randint(11, 49), rng.randint(2, 9)
        steps = [(a, "*", b, a * b)]
        for _ in range(self.n_ops):
            value, y = steps[-1][3], rng.randint(1, self.max_operand)
            op = rng.choice("+-")
            if op == "-" and value - y < 0 or op == "+" and value + y > MAX_VALUE:
                op = "+" if op == "-" else "-"
            steps.append((value, op, y, value + y if op == "+" else value - y))
        return self.solve(steps)

    def solve(self, steps: list[tuple[int, str, int, int]]) -> ToyProblem:
        """The problem of the steps (a, op, b, c) and its gold solution in this task's style
        (forms drawn with a generator seeded by the question)."""
        question = f"{steps[0][0]}*{steps[0][2]}" + "".join(f"{op}{y}" for _, op, y, _ in steps[1:])
        style = STYLES[self.style]
        rng = random.Random(f"{self.style}:{question}")
        text = []
        for i, (x, op, y, z) in enumerate(steps):
            if i < self.canonical_steps:
                text.append(write_step(x, op, y, z, "symbolic"))
                continue
            form = rng.choices(FORMS, weights=style.forms)[0]
            connective = rng.choice(CONNECTIVES) if rng.random() < style.connective else ""
            text.append(write_step(x, op, y, z, form, connective))
        answer = str(steps[-1][3])
        solution = " ".join(text + [f"\\boxed{{{answer}}}"])
        return ToyProblem(question=question, prompt=f"Compute {question}.", solution=solution, answer=answer)
