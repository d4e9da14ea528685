"""The toy world: task correctness, split hygiene, tokenizer round trip, grader."""

from __future__ import annotations

import random

import pytest

from opdcli.grading import grade, last_boxed
from opdcli.toy.task import ToyTask, solve


def _python_value(question: str) -> int:
    return eval(question)  # the question only holds digits and + - *; * binds tighter, as in Python


@pytest.mark.parametrize("n_ops", [1, 2, 4, 8])
def test_solutions_are_correct_and_boxed(n_ops):
    task, rng = ToyTask(n_ops=n_ops), random.Random(n_ops)
    for _ in range(200):
        p = task.sample(rng)
        assert int(p.answer) == _python_value(p.question)
        assert last_boxed(p.solution) == p.answer
        assert p.solution.count("=") == n_ops  # one step per operator


def test_solve_applies_multiplication_first():
    p = solve([3, 4, 5], ["+", "*"])
    assert p.solution == "4*5=20. 3+20=23. \\boxed{23}"


def test_heldout_is_deterministic_and_disjoint_from_training():
    task = ToyTask()
    held = task.heldout(0, 256)
    assert [p.question for p in held] == [p.question for p in task.heldout(0, 256)]
    assert len({p.question for p in held}) == 256
    exclude = {p.question for p in held}
    stream = task.stream(123, exclude)
    assert not any(next(stream).question in exclude for _ in range(2000))


def test_long_variant_has_long_answers(toy_tokenizer):
    task, rng = ToyTask(n_ops=10), random.Random(0)
    lengths = [len(toy_tokenizer(task.sample(rng).solution)["input_ids"]) for _ in range(50)]
    assert sum(lengths) / len(lengths) > 100


def test_tokenizer_round_trip_and_chat_template(toy_tokenizer):
    text = "Compute 14*2-12.\n14*2=28. 28-12=16. \\boxed{16}"
    ids = toy_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert toy_tokenizer.decode(ids) == text
    rendered = toy_tokenizer.apply_chat_template([{"role": "user", "content": "hi"}],
                                                 add_generation_prompt=True, tokenize=False)
    assert rendered == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    im_end = toy_tokenizer("<|im_end|>", add_special_tokens=False)["input_ids"]
    assert im_end == [toy_tokenizer.eos_token_id]


@pytest.mark.parametrize(("response", "answer", "ok"), [
    ("1+2=3. \\boxed{3}", "3", True),
    ("\\boxed{-24}", "-24", True),
    ("\\boxed{4} then \\boxed{3}", "3", True),
    ("\\boxed{3.0}", "3", True),
    ("<think>\\boxed{3}</think> \\boxed{5}", "3", False),
    ("no answer", "3", False),
    ("\\boxed{3", "3", False),
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}", True),
])
def test_grader(response, answer, ok):
    assert grade(response, answer) is ok


def test_shipped_long_pair_leaves_room_to_learn(toy_tokenizer):
    """teacher-long solves the long task; student-long is weak but not hopeless (about 16%)."""
    import torch

    from opdcli.config import DataConfig, ToyTaskConfig
    from opdcli.data import heldout_prompts
    from opdcli.models import load_model
    from opdcli.run.heldout import heldout_accuracy

    prompts = heldout_prompts(DataConfig(toy=ToyTaskConfig(n_ops=8, max_operand=20, ops="+-")), 32)
    acc = {}
    for name in ("teacher-long", "student-long"):
        model = load_model(f"toy:{name}", torch.device("cpu"), torch.float32)
        acc[name] = heldout_accuracy(model, toy_tokenizer, prompts, 160, 32)["eval/heldout/accuracy"]
    assert acc["teacher-long"] >= 0.9
    assert 0.0 < acc["student-long"] <= 0.4
