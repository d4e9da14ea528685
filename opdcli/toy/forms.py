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
import re
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
PROMPT = "Compute {}."


def apply(a: int, op: str, b: int) -> int:
    """a op b for the world's three operations."""
    return a * b if op == "*" else a + b if op == "+" else a - b


def question_of(prompt: str) -> str:
    """The question of a forms prompt (the inverse of PROMPT)."""
    return prompt.removeprefix(PROMPT.split("{}")[0]).removesuffix(PROMPT.split("{}")[1])


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
            steps.append((value, op, y, apply(value, op, y)))
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
        return ToyProblem(question=question, prompt=PROMPT.format(question), solution=solution, answer=answer)


_STEP = re.compile(
    r"^(?:Then |Next, |Now |So )?(?:(?P<a>\d+)(?P<op>[-+*])(?P<b>\d+)=(?P<c>\d+)"
    r"|(?P<c2>\d+) = (?P<a2>\d+) (?P<op2>[-+*]) (?P<b2>\d+)"
    r"|(?P<a3>\d+) (?P<w>plus|minus|times) (?P<b3>\d+) is (?P<c3>\d+))$")
_WORD_OP = {word: op for op, word in WORDS.items()}


@dataclass(frozen=True)
class StepRead:
    """One sentence of an answer, read against the question's operations."""

    index: int
    form: str | None
    """symbolic / result_first / words, or None when the sentence is not a step."""
    arithmetic_right: bool
    """c = a op b."""
    operand_right: bool
    """op and b are the question's operation at this index, and a carries the previous
    sentence's result (the question's first operand at step 0): the pointer, apart from the
    arithmetic."""


def question_steps(question: str) -> list[tuple[str, int]]:
    """The operations of a forms question `a*b+c-d...`: [("*", b), ("+", c), ("-", d), ...]
    after the first operand."""
    tokens = re.findall(r"[-+*]|\d+", question)
    return [(tokens[i], int(tokens[i + 1])) for i in range(1, len(tokens) - 1, 2)]


def read_steps(question: str, answer: str) -> list[StepRead]:
    """Read an answer sentence by sentence (up to its boxed answer) against the question: which
    form each step is in, whether its arithmetic is right and whether it takes the question's
    next operation on the value it carries. A sentence that is no step is read as wrong."""
    ops = question_steps(question)
    value: int | None = int(re.match(r"\d+", question).group())
    body = answer.split("\\boxed{", 1)[0]
    out = []
    for i, sentence in enumerate(s.strip() for s in body.split(".") if s.strip()):
        m = _STEP.match(sentence)
        if m is None:
            out.append(StepRead(i, None, False, False))
            value = None
            continue
        if m["a"] is not None:
            a, op, b, c, form = int(m["a"]), m["op"], int(m["b"]), int(m["c"]), "symbolic"
        elif m["a2"] is not None:
            a, op, b, c, form = int(m["a2"]), m["op2"], int(m["b2"]), int(m["c2"]), "result_first"
        else:
            a, op, b, c, form = int(m["a3"]), _WORD_OP[m["w"]], int(m["b3"]), int(m["c3"]), "words"
        out.append(StepRead(i, form, c == apply(a, op, b), i < len(ops) and ops[i] == (op, b) and a == value))
        value = c
    return out
