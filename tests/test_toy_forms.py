"""The second toy world: surface forms, styles, the BPE tokenizer and its config (opdcli.toy.forms)."""

from __future__ import annotations

import random
import re

import pytest
import torch

from opdcli import config as C
from opdcli.errors import ConfigError, ModelError
from opdcli.toy.forms import CONNECTIVES, STYLES, FormsTask, read_steps, write_step
from opdcli.validate import validate_train_config

STEP = re.compile(
    r"^(?:Then |Next, |Now |So )?(?:(?P<a>\d+)(?P<op>[-+*])(?P<b>\d+)=(?P<c>\d+)"
    r"|(?P<c2>\d+) = (?P<a2>\d+) (?P<op2>[-+*]) (?P<b2>\d+)"
    r"|(?P<a3>\d+) (?P<w>plus|minus|times) (?P<b3>\d+) is (?P<c3>\d+))\.$")
WORD_OP = {"plus": "+", "minus": "-", "times": "*"}


def parse(solution: str) -> tuple[list[tuple[int, str, int, int, str]], str]:
    """Steps (a, op, b, c, form) and the boxed answer of a solution, by a reader independent of
    the writer."""
    body, boxed = solution.rsplit(" \\boxed{", 1)
    steps = []
    for sentence in re.findall(r"[^.]*\.", body):
        m = STEP.match(sentence.strip())
        assert m, sentence
        if m["a"] is not None:
            steps.append((int(m["a"]), m["op"], int(m["b"]), int(m["c"]), "symbolic"))
        elif m["a2"] is not None:
            steps.append((int(m["a2"]), m["op2"], int(m["b2"]), int(m["c2"]), "result_first"))
        else:
            steps.append((int(m["a3"]), WORD_OP[m["w"]], int(m["b3"]), int(m["c3"]), "words"))
    return steps, boxed.rstrip("}")


def test_write_step_forms():
    assert write_step(12, "+", 5, 17, "symbolic") == "12+5=17."
    assert write_step(12, "-", 5, 7, "result_first", "Then ") == "Then 7 = 12 - 5."
    assert write_step(3, "*", 4, 12, "words") == "3 times 4 is 12."


@pytest.mark.parametrize("style", sorted(STYLES))
def test_every_step_is_right_and_chains_to_the_answer(style):
    task = FormsTask(style=style)
    forms = []
    for i in range(200):
        p = task.sample(random.Random(i))
        steps, answer = parse(p.solution)
        assert len(steps) == task.n_ops + 1 and steps[0][1] == "*"
        value = None
        for a, op, b, c, form in steps:
            assert c == (a * b if op == "*" else a + b if op == "+" else a - b)
            assert value is None or a == value  # each step continues from the last result
            assert 0 <= c <= 999
            value = c
            forms.append(form)
        assert answer == p.answer == str(value)
        # the question holds the same operands, in order
        assert p.question == f"{steps[0][0]}*{steps[0][2]}" + "".join(f"{op}{b}" for _, op, b, _, _ in steps[1:])
        assert [f for *_, f in steps[: task.canonical_steps]] == ["symbolic"] * task.canonical_steps
        assert not any(p.solution.split(". ")[k].startswith(CONNECTIVES) for k in range(task.canonical_steps))
    share = {f: forms.count(f) / len(forms) for f in ("symbolic", "result_first", "words")}
    if style == "symbolic":
        assert share["words"] == 0
    if style == "even":
        assert all(0.2 < v < 0.5 for v in share.values())
    if style == "words":
        assert share["words"] > 0.6


def test_split_is_shared_by_styles_and_excluded_from_training():
    even, sym = FormsTask(style="even"), FormsTask(style="symbolic")
    held = even.heldout(0, 300)
    assert len(held) == 300 and [p.question for p in held] == [p.question for p in sym.heldout(0, 300)]
    assert all(p.answer == q.answer for p, q in zip(held, sym.heldout(0, 300), strict=True))
    exclude = {p.question for p in held}
    train = [p for _, p in zip(range(2000), even.stream(1, exclude), strict=False)]
    assert not exclude & {p.question for p in train}
    # gold solutions are reproducible
    again = FormsTask(style="even").heldout(0, 300)
    assert [p.solution for p in again] == [p.solution for p in held]


def test_bpe_tokenizer_is_deterministic_splits_digits_and_fits_the_embeddings():
    from opdcli.toy.tokenizer import FORMS_EMBEDDINGS, build_forms_tokenizer

    a, b = build_forms_tokenizer(corpus_size=600), build_forms_tokenizer(corpus_size=600)
    assert a.get_vocab() == b.get_vocab()
    tok = build_forms_tokenizer()
    assert 200 < len(tok) <= FORMS_EMBEDDINGS
    p = FormsTask().sample(random.Random(3))
    ids = tok.encode(p.solution)
    assert tok.decode(ids) == p.solution
    pieces = tok.convert_ids_to_tokens(ids)
    assert all(len(x.lstrip("Ġ")) <= 1 for x in pieces if any(ch.isdigit() for ch in x))  # one digit per token
    assert any(len(x) > 3 for x in pieces)  # words are merged
    assert len(ids) < len(p.solution) / 1.2  # fewer tokens than characters
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    chat = tok.apply_chat_template([{"role": "user", "content": p.prompt}], add_generation_prompt=True, tokenize=False)
    assert chat.endswith("<|im_start|>assistant\n")


def test_config_selects_the_world_and_refuses_knobs_of_the_other():
    from opdcli.data import heldout_prompts
    from opdcli.grading import grade

    cfg, _ = C.load_config(C.TrainRunConfig, None, ["data.toy.world=forms", "data.toy.n_ops=4"])
    prompts = heldout_prompts(cfg.data, 5)
    assert len(prompts) == 5 and prompts[0].messages[-1]["content"].count("+") + \
        prompts[0].messages[-1]["content"].count("-") == 4
    assert grade(prompts[0].solution, prompts[0].answer)
    for overrides, message in ((["data.toy.world=forms", "data.toy.ops=+-"], "data.toy.ops cannot take effect"),
                               (["data.toy.style=words"], "data.toy.style cannot take effect")):
        cfg, explicit = C.load_config(C.TrainRunConfig, None, overrides)
        with pytest.raises(ConfigError, match=message):
            validate_train_config(cfg, explicit)


def test_build_a_forms_model_with_padded_embeddings(tmp_path):
    """`opd toy build --world forms` saves a Qwen3 model whose embeddings are padded beyond its
    BPE tokenizer; it loads like a hub checkpoint and answers a forms prompt."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from opdcli.loops.distill import run_distill
    from opdcli.loops.toy_build import TOY_SPECS, build_toy_model
    from opdcli.toy.tokenizer import FORMS_EMBEDDINGS

    spec = TOY_SPECS["student-forms"]
    assert spec.world == "forms" and spec.task.style == "even" and spec.init_from == "student-forms-8"
    assert TOY_SPECS["teacher-forms-symbolic"].task.style == "symbolic"
    with pytest.raises(ModelError, match="build it first: opd toy build student-forms-8"):
        build_toy_model(spec, tmp_path / "student-forms", distill=run_distill, steps=1, eval_size=2)
    first = build_toy_model(TOY_SPECS["student-forms-8"], tmp_path / "student-forms-8", distill=run_distill,
                            steps=2, eval_size=4)
    metrics = build_toy_model(spec, tmp_path / "student-forms", distill=run_distill, steps=2, eval_size=4)
    assert 0.0 <= first["eval/heldout/accuracy"] <= 1.0 and 0.0 <= metrics["eval/heldout/accuracy"] <= 1.0
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "student-forms")
    start = AutoModelForCausalLM.from_pretrained(tmp_path / "student-forms-8")
    assert not torch.equal(model.lm_head.weight, start.lm_head.weight)  # stage 2 trained on from stage 1
    tok = AutoTokenizer.from_pretrained(tmp_path / "student-forms")
    assert model.config.vocab_size == FORMS_EMBEDDINGS > len(tok)
    assert model.config.head_dim == 32 and tok.eos_token_id == model.generation_config.eos_token_id


def test_forms_curriculum_stages_come_first_and_share_the_architecture():
    """Every forms model that grows from another is listed after it (the default build order),
    in the same world, with the same architecture, on a task at least as long."""
    from opdcli.loops.toy_build import TOY_SPECS

    order = list(TOY_SPECS)
    grown = [s for s in TOY_SPECS.values() if s.world == "forms" and s.init_from]
    assert {s.name for s in grown} >= {"teacher-forms", "teacher-forms-symbolic", "student-forms"}
    for spec in grown:
        start = TOY_SPECS[spec.init_from]
        assert order.index(start.name) < order.index(spec.name) and start.world == spec.world
        assert (start.hidden, start.layers, start.head_dim) == (spec.hidden, spec.layers, spec.head_dim)
        assert start.task.n_ops <= spec.task.n_ops
    assert TOY_SPECS["teacher-forms-8"].task.n_ops == 8 and TOY_SPECS["teacher-forms"].task.n_ops == 16


def test_read_steps_finds_the_pointer_and_the_arithmetic_errors():
    for style in sorted(STYLES):
        task = FormsTask(n_ops=6, style=style)
        for i in range(50):
            p = task.sample(random.Random(i))
            read = read_steps(p.question, p.solution)
            assert len(read) == 7 and all(s.arithmetic_right and s.operand_right for s in read)
            assert [s.form for s in read] == [f for *_, f in parse(p.solution)[0]]
    q = "12*3+4-5+6"
    # the right operation, wrong sum; then the next step carries the wrong value (still on the pointer)
    read = read_steps(q, "12*3=36. 36+4=41. 41 minus 5 is 36. 42 = 36 + 6. \\boxed{42}")
    assert [(s.arithmetic_right, s.operand_right) for s in read] == [(True, True), (False, True), (True, True),
                                                                   (True, True)]
    assert [s.form for s in read] == ["symbolic", "symbolic", "words", "result_first"]
    # skipping an operation is a pointer error even when the arithmetic is right; a non-step is wrong
    read = read_steps(q, "12*3=36. 36-5=31. So 31+6=37. I am done. \\boxed{37}")
    assert [(s.arithmetic_right, s.operand_right) for s in read] == [(True, True), (True, False), (True, False),
                                                                   (False, False)]
    assert read[-1].form is None
    # a step that starts from another value than the previous result is off the pointer
    assert not read_steps(q, "12*3=36. 30+4=34.")[1].operand_right


def test_toy_build_refuses_an_unknown_world(tmp_path):
    from typer.testing import CliRunner

    from opdcli.cli import app

    result = CliRunner().invoke(app, ["toy", "build", "--world", "chess", "--out", str(tmp_path)])
    assert result.exit_code != 0 and "unknown toy world 'chess'; choose from arith, forms" in result.output


def test_sampled_heldout_evaluation_is_seeded_and_validated(tiny_dirs, toy_tokenizer):
    """eval.samples answers per problem at eval.temperature: the same seed gives the same
    answers, another seed others; greedy-only runs refuse the sampled evaluation's knobs."""
    from transformers import AutoModelForCausalLM

    from opdcli.data import heldout_prompts
    from opdcli.run.heldout import heldout_accuracy

    model = AutoModelForCausalLM.from_pretrained(tiny_dirs["student"])
    cfg, _ = C.load_config(C.TrainRunConfig, None, [])
    prompts = heldout_prompts(cfg.data, 6)
    runs = [heldout_accuracy(model, toy_tokenizer, prompts, 40, 8, samples=4, temperature=1.0, seed=s)
            for s in (3, 3, 4)]
    assert runs[0] == runs[1]
    assert runs[0]["eval/heldout/response_len"] != runs[2]["eval/heldout/response_len"]
    for overrides, message in ((["eval.temperature=0.7"], "eval.temperature cannot take effect"),
                               (["eval.samples=4", "eval.temperature=0"], "needs a temperature > 0"),
                               (["eval.samples=-1"], "eval.samples is -1")):
        cfg, explicit = C.load_config(C.TrainRunConfig, None, overrides)
        with pytest.raises(ConfigError, match=message):
            validate_train_config(cfg, explicit)


def test_sampled_evaluation_cadence(tmp_path):
    """eval.samples_every: the greedy curve at every evaluation, the sampled one only at its own
    multiples (and before and after training); a cadence off the evaluation steps is refused."""
    from opdcli.loops.train import run_train
    from opdcli.run.tracking import read_metrics

    overrides = [f"run.out_dir={tmp_path}", "train.max_steps=4", "rollout.prompts_per_step=2",
                 "train.rollouts_every=0", "eval.size=4", "eval.every=1", "eval.samples=2", "eval.samples_every=2"]
    cfg, explicit = C.load_config(C.TrainRunConfig, "configs/toy/opd.yaml", overrides)
    run_train(cfg, explicit, argv=["test"])
    greedy, sampled = set(), set()
    for row in read_metrics(tmp_path / "metrics.jsonl"):
        for label in ("eval", "eval_before", "eval_after"):
            if f"{label}/heldout/accuracy" in row:
                greedy.add((label, row["progress/step"]))
            if f"{label}/heldout_sampled/accuracy" in row:
                sampled.add((label, row["progress/step"]))
    assert greedy == {("eval_before", 0), ("eval", 1), ("eval", 2), ("eval", 3), ("eval_after", 4)}
    assert sampled == {("eval_before", 0), ("eval", 2), ("eval_after", 4)}
    for overrides, message in ((["eval.samples=2", "eval.every=2", "eval.samples_every=3"], "multiple of eval.every"),
                               (["eval.samples=2", "eval.every=0", "eval.samples_every=2"], "multiple of eval.every"),
                               (["eval.samples_every=2"], "eval.samples_every cannot take effect")):
        cfg, explicit = C.load_config(C.TrainRunConfig, None, overrides)
        with pytest.raises(ConfigError, match=message):
            validate_train_config(cfg, explicit)


def test_shipped_forms_models_solve_and_write_their_style():
    """The shipped forms world: both 16-operation teachers solve held-out problems the student
    does not (greedy, 32 problems), and the incompatible teacher never writes the words form
    the compatible one writes a third of the time."""
    from opdcli.data import heldout_prompts, render
    from opdcli.engines.hf_sampler import HFSampler, decode_responses
    from opdcli.engines.types import SamplingParams
    from opdcli.grading import grade
    from opdcli.models import load_model, load_tokenizer
    from opdcli.toy.forms import question_of

    cfg, _ = C.load_config(C.TrainRunConfig, "configs/toy/forms/opd.yaml", [])
    prompts = heldout_prompts(cfg.data, 32)
    tok = load_tokenizer("toy:student-forms")
    read = {}
    for name in ("toy:teacher-forms", "toy:teacher-forms-symbolic", "toy:student-forms"):
        model = load_model(name, torch.device("cpu"), torch.float32)
        params = SamplingParams(n=1, temperature=0.0, max_new_tokens=320, batch_size=32)
        answers = decode_responses(tok, HFSampler(model, tok).sample([render(tok, p) for p in prompts], params))
        late = [s for p, a in zip(prompts, answers, strict=True)
                for s in read_steps(question_of(p.messages[-1]["content"]), a) if s.index >= cfg.data.toy.canonical_steps]
        read[name] = (sum(grade(a, p.answer) for a, p in zip(answers, prompts, strict=True)) / len(prompts),
                      sum(s.form == "words" for s in late) / max(1, len(late)))
    student = read["toy:student-forms"][0]
    assert read["toy:teacher-forms"][0] >= 0.15 + student and read["toy:teacher-forms-symbolic"][0] >= 0.15 + student
    assert read["toy:teacher-forms-symbolic"][1] < 0.02 < 0.15 < read["toy:teacher-forms"][1]
