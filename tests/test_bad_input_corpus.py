"""A corpus of malformed inputs across every command and input kind. Each must meet the bar:
exit code 2, exactly one `error:` line that names the problem (the needle), no traceback, and
nothing already written lost (the files in the way are unchanged).

Counted in the note as meeting / total (`pytest tests/test_bad_input_corpus.py`)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from opdcli.cli import app

ROOT = Path(__file__).parents[1]
FIX = Path(__file__).parent / "fixtures" / "benchmarks"
runner = CliRunner()


def _student_copy(tmp: Path, drop: tuple[str, ...] = (), damage: str | None = None) -> Path:
    from opdcli.models import resolve_model_path

    dst = tmp / "model"
    shutil.copytree(resolve_model_path("toy:student"), dst)
    for name in drop:
        (dst / name).unlink()
    if damage:
        (dst / damage).write_bytes((dst / damage).read_bytes()[:300])
    return dst


def _write(tmp: Path, name: str, content: str | bytes) -> Path:
    p = tmp / name
    if isinstance(content, bytes):
        p.write_bytes(content)
    else:
        p.write_text(content)
    return p


def _run_dir_with_bad_latest(tmp: Path) -> Path:
    run = tmp / "oldrun"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "latest").write_text("step_40\n")
    (run / "metrics.jsonl").write_text('{"progress/step": 1}\n')
    return run


TRAIN = ["train", "--set", "train.max_steps=1", "--set", "eval.enabled=false", "--set",
         "rollout.prompts_per_step=2"]

# id: (builder(tmp) -> argv, needle)
CASES = {
    # configuration values
    "train-lr-negative": (lambda t: TRAIN + ["--set", "optim.lr=-0.1", "--set", f"run.out_dir={t}/r"], "optim.lr is -0.1"),
    "train-lr-nan": (lambda t: TRAIN + ["--set", "optim.lr=nan", "--set", f"run.out_dir={t}/r"], "optim.lr is nan"),
    "train-lr-text": (lambda t: TRAIN + ["--set", "optim.lr=fast", "--set", f"run.out_dir={t}/r"], "optim.lr"),
    "train-save-every-negative": (lambda t: TRAIN + ["--set", "train.save_every=-5", "--set", f"run.out_dir={t}/r"],
                                  "train.save_every is -5"),
    "train-keep-negative": (lambda t: TRAIN + ["--set", "train.keep_checkpoints=-1", "--set", f"run.out_dir={t}/r"],
                            "train.keep_checkpoints is -1"),
    "train-betas": (lambda t: TRAIN + ["--set", "optim.betas=[0.9,1.5]", "--set", f"run.out_dir={t}/r"], "optim.betas"),
    "train-unknown-key": (lambda t: TRAIN + ["--set", "optim.learning_rate=1e-4"], "optim.learning_rate"),
    "train-unknown-method": (lambda t: ["train", "--method", "nosuch"], "nosuch"),
    "train-bad-objective": (lambda t: TRAIN + ["--set", "loss.objective=kl"], "loss.objective"),
    "train-set-without-equals": (lambda t: TRAIN + ["--set", "optim.lr"], "optim.lr"),
    "train-top-k-too-big": (lambda t: TRAIN + ["--set", "scoring.top_k=1000"], "scoring.top_k"),
    "train-student-scores-impossible": (lambda t: TRAIN + ["--method", "prune", "--set",
                                                           "scoring.student_scores=train_forward"], "cannot take effect"),
    # config files
    "config-missing": (lambda t: ["train", "--config", str(t / "nope.yaml")], "does not exist"),
    "config-empty": (lambda t: ["train", "--config", str(_write(t, "empty.yaml", "# nothing\n"))], "is empty"),
    "config-bad-yaml": (lambda t: ["train", "--config", str(_write(t, "bad.yaml", "optim: [1, 2\n"))],
                        "not valid YAML"),
    "config-not-mapping": (lambda t: ["train", "--config", str(_write(t, "list.yaml", "- 1\n- 2\n"))], "mapping"),
    "config-binary": (lambda t: ["train", "--config", str(_write(t, "bin.yaml", b"\xff\xfe\x00bad"))], "UTF-8"),
    # models
    "model-missing": (lambda t: TRAIN + ["--set", "model.student=/no/such/model"], "does not exist"),
    "model-no-config": (lambda t: TRAIN + ["--set", f"model.student={_student_copy(t, drop=('config.json',))}"],
                        "no config.json"),
    "model-no-tokenizer": (lambda t: TRAIN + ["--set", f"model.student={_student_copy(t, drop=('tokenizer.json', 'tokenizer_config.json'))}"],
                           "no tokenizer files"),
    "model-truncated-weights": (lambda t: TRAIN + ["--set", f"run.out_dir={t}/r", "--set",
                                                   f"model.student={_student_copy(t, damage='model.safetensors')}"],
                                "cannot load model"),
    # resume
    "resume-nothing-there": (lambda t: TRAIN + ["--set", f"run.resume={t}"], "holds no checkpoint"),
    "resume-latest-names-missing": (lambda t: TRAIN + ["--set", f"run.resume={_run_dir_with_bad_latest(t)}"],
                                    "names step_40, which is missing"),
    "run-dir-taken": (lambda t: TRAIN + ["--set", f"run.out_dir={_run_dir_with_bad_latest(t)}"], "already holds a run"),
    # data
    "data-missing-file": (lambda t: TRAIN + ["--set", f"data.source={t / 'nope.jsonl'}"], "nope.jsonl"),
    "data-not-json": (lambda t: TRAIN + ["--set", "data.source=" + str(_write(t, 'p.jsonl', 'not json' + chr(10)))], "p.jsonl"),
    "data-no-prompt-field": (lambda t: TRAIN + ["--set", f"data.source={_write(t, 'p.jsonl', json.dumps({'q': 'x'}) + chr(10))}"],
                             "prompt"),
    "data-corrupt-parquet": (lambda t: TRAIN + ["--set", f"data.source={_write(t, 'p.parquet', b'PAR1garbage')}"],
                             "p.parquet"),
    "data-non-utf8": (lambda t: TRAIN + ["--set", "data.source=" + str(_write(t, 'p.jsonl', b'{"prompt": "' + bytes([255]) + b'"}'))],
                      "p.jsonl"),
    "data-prompt-beyond-context": (lambda t: TRAIN + ["--set", f"run.out_dir={t}/r", "--set",
                                                      f"data.source={_write(t, 'long.jsonl', json.dumps({'prompt': '1+1=' * 800}) + chr(10))}"],
                                   "exceeds the model's context"),
    # distill
    "distill-bad-traces": (lambda t: ["distill", "--set", "distill.traces=silver"], "distill.traces"),
    "distill-lr-negative": (lambda t: ["distill", "--set", "optim.lr=-1", "--set", f"run.out_dir={t}/r"], "optim.lr"),
    # rollout
    "rollout-top-k": (lambda t: ["rollout", "--top-k", "100", "--out", str(t / "r.jsonl")], "top"),
    "rollout-n-zero": (lambda t: ["rollout", "--n", "0", "--out", str(t / "r.jsonl")], "at least 1"),
    # diagnose
    "diagnose-missing": (lambda t: ["diagnose", str(t / "nope.jsonl"), "--out", str(t / "d")], "nope.jsonl"),
    "diagnose-empty": (lambda t: ["diagnose", str(_write(t, "e.jsonl", "")), "--out", str(t / "d")], "e.jsonl"),
    "diagnose-not-utf8": (lambda t: ["diagnose", str(_write(t, "b.jsonl", b"\xff\xfe{}\n")), "--out", str(t / "d")],
                          "b.jsonl"),
    "diagnose-not-records": (lambda t: ["diagnose", str(_write(t, "n.jsonl", '{"a": 1}\n')), "--out", str(t / "d")],
                             "n.jsonl"),
    "diagnose-bad-format": (lambda t: ["diagnose", str(_write(t, "f.jsonl", '{"a": 1}\n')), "--out", str(t / "d"),
                                       "--format", "xml"], "format"),
    # eval
    "eval-unknown-bench": (lambda t: ["eval", "--bench", "nosuch", "--model", "toy:student"], "nosuch"),
    "eval-missing-model": (lambda t: ["eval", "--bench", "toy-arith", "--model", "/no/model"], "does not exist"),
    "eval-replay-without-completions": (lambda t: ["eval", "--bench", "aime25", "--generator", "replay",
                                                   "--data", str(FIX / "aime25.jsonl")], "completions"),
    "eval-bad-generator": (lambda t: ["eval", "--bench", "aime25", "--generator", "magic"], "magic"),
    "eval-malformed-lcb-rows": (lambda t: ["eval", "--bench", "livecodebench", "--generator", "replay",
                                           "--data", str(_write(t, "lcb.jsonl", json.dumps({"question_id": "1"}) + "\n")),
                                           "--completions", str(FIX / "completions_livecodebench.jsonl"),
                                           "--out", str(t / "e")], "lcb.jsonl"),
    "eval-bad-harness": (lambda t: ["eval", "--bench", "aime25", "--harness", "helm"], "helm"),
    # sweep, toy
    "sweep-missing": (lambda t: ["sweep", "--config", str(t / "nope.yaml")], "does not exist"),
    "sweep-empty": (lambda t: ["sweep", "--config", str(_write(t, "s.yaml", ""))], "is empty"),
    "toy-build-out-file": (lambda t: ["toy", "build", "student", "--out", str(_write(t, "afile", "x"))], "is a file"),
    "toy-build-unknown": (lambda t: ["toy", "build", "giant"], "giant"),
}


def _snapshot(tmp: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in tmp.rglob("*") if p.is_file()}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_meets_the_bar(case, tmp_path):
    build, needle = CASES[case]
    argv = build(tmp_path)
    before = _snapshot(tmp_path)
    result = runner.invoke(app, argv)
    text = result.output
    assert result.exit_code == 2, (case, result.exit_code, text[-2000:], result.exception)
    assert "Traceback" not in text, text[-2000:]
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, text[-2000:]
    assert needle in errors[0], (needle, errors[0])
    after = _snapshot(tmp_path)
    lost = [p for p, b in before.items() if after.get(p) != b]
    assert lost == [], f"{case} changed or removed {lost}"
