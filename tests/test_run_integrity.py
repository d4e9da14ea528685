"""Runs that lose nothing: kill -9 and resume, partial lines, checkpoints written atomically and
never deleted before their replacement, a full disk, two writers, config changes on resume,
Ctrl-C; and no silent failure: non-finite teachers, learning rates, prompts beyond the context."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from opdcli import config as C
from opdcli.errors import CheckpointError, ConfigError, DataError, NonFiniteError
from opdcli.run.tracking import MetricsLogger, read_metrics

ROOT = Path(__file__).parents[1]
FAST = ["rollout.prompts_per_step=4", "rollout.samples_per_prompt=1", "rollout.max_new_tokens=16",
        "eval.size=8", "eval.every=0", "train.rollouts_every=1"]


def _cfg(tmp: Path, *extra: str):
    return C.load_config(C.TrainRunConfig, str(ROOT / "configs/toy/opd.yaml"),
                         [f"run.out_dir={tmp}", *FAST, *extra])


def _train(tmp: Path, *extra: str):
    from opdcli.loops.train import run_train

    cfg, explicit = _cfg(tmp, *extra)
    return run_train(cfg, explicit, argv=["test"])


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "opdcli.cli", *args]


def _sets(run: Path, *extra: str) -> list[str]:
    out = ["--config", str(ROOT / "configs/toy/opd.yaml"), "--set", f"run.out_dir={run}"]
    for s in (*FAST, *extra):
        out += ["--set", s]
    return out


def _wait_for_steps(run: Path, n: int, proc: subprocess.Popen, timeout: float = 240) -> None:
    end = time.time() + timeout
    while time.time() < end:
        assert proc.poll() is None, proc.communicate()
        path = run / "metrics.jsonl"
        if path.exists() and sum('"loss/total"' in line for line in path.read_text().splitlines()) >= n:
            return
        time.sleep(0.1)
    raise AssertionError(f"no {n} steps within {timeout} s")


# -- resume after kill -9 --------------------------------------------------------------------

@pytest.mark.slow
def test_kill9_then_resume_keeps_each_step_once(tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen(_cli("train", *_sets(run, "train.max_steps=200", "train.save_every=4")),
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _wait_for_steps(run, 10, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # a row half-written at the kill
    with open(run / "metrics.jsonl", "a") as fh:
        fh.write('{"progress/step": 99, "loss/to')
    done = subprocess.run(_cli("train", *_sets(run, "train.max_steps=14", "train.save_every=4",
                                               f"run.resume={run}")), cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = read_metrics(run / "metrics.jsonl")
    steps = [r["progress/step"] for r in rows if "loss/total" in r]
    assert steps == list(range(1, 15)), steps
    assert sum(1 for r in rows if any(k.startswith("eval_before/") for k in r)) == 1
    assert any(k.startswith("eval_resumed/") for r in rows for k in r)
    records = [json.loads(line) for line in (run / "rollouts.jsonl").read_text().splitlines()]
    keys = [(r["step"], r["sample_id"]) for r in records]
    assert len(keys) == len(set(keys)) == 14 * 4
    cut = (run / "metrics.cut.jsonl").read_text().splitlines()
    assert cut and any('"progress/step": 99' in line for line in cut)  # the partial row is kept aside
    assert (run / "rollouts.cut.jsonl").is_file()
    from opdcli.records import read_records

    assert len(list(read_records(run / "rollouts.jsonl"))) == 14 * 4


# -- metrics.jsonl partial lines ---------------------------------------------------------------

def test_metrics_logger_repairs_a_partial_last_row(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"progress/step": 1, "a": 1.0}\n{"progress/step": 2, "a"')
    with pytest.warns(UserWarning, match="partial last line"):
        log = MetricsLogger(tmp_path)
    log.log(3, {"a": 3.0})
    log.close()
    assert [r["progress/step"] for r in read_metrics(path)] == [1, 3]


def test_read_metrics_skips_a_partial_tail_and_names_a_damaged_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"progress/step": 1}\n{"progress/st')
    with pytest.warns(UserWarning, match="partial last line"):
        assert read_metrics(path) == [{"progress/step": 1}]
    path.write_text('{"progress/step": 1}\nnot json\n{"progress/step": 2}\n')
    with pytest.raises(ConfigError, match=r"metrics.jsonl:2 is not a JSON object"):
        read_metrics(path)
    path.write_bytes(b'{"progress/step": 1}\n\xff\xfe\n')
    with pytest.raises(ConfigError, match="not UTF-8"):
        read_metrics(path)


# -- checkpoints ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run = tmp_path_factory.mktemp("ckpt") / "run"
    _train(run, "train.max_steps=4", "train.save_every=2", "train.keep_checkpoints=5", "eval.enabled=false")
    return run


def _copy(run: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(run, dst)
    return dst


@pytest.mark.parametrize("latest", ["", None, "step_30\n"], ids=["empty", "missing", "names-missing"])
def test_a_broken_latest_falls_back_to_the_newest_complete_checkpoint(trained, tmp_path, latest):
    from opdcli.run.checkpoint import resolve_resume

    run = _copy(trained, tmp_path / "run")
    if latest is None:
        (run / "checkpoints" / "latest").unlink()
    else:
        (run / "checkpoints" / "latest").write_text(latest)
    (run / "checkpoints" / "step_6").mkdir()  # an incomplete folder is never chosen
    with pytest.warns(UserWarning, match="newest complete checkpoint"):
        assert resolve_resume(str(run)).name == "step_4"


def test_no_complete_checkpoint_names_what_is_wrong(trained, tmp_path):
    from opdcli.run.checkpoint import resolve_resume

    run = _copy(trained, tmp_path / "run")
    for step in (2, 4):
        (run / "checkpoints" / f"step_{step}" / "trainer_state.pt").unlink()
    with pytest.raises(CheckpointError, match="no complete step_<N>"):
        resolve_resume(str(run))


def test_damaged_trainer_state_and_weights_are_one_line_errors(trained, tmp_path):
    run = _copy(trained, tmp_path / "run")
    state = run / "checkpoints" / "step_4" / "trainer_state.pt"
    state.write_bytes(state.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="trainer_state.pt is damaged"):
        _train(tmp_path / "resumed", f"run.resume={run / 'checkpoints' / 'step_4'}", "train.max_steps=5",
               "eval.enabled=false")
    weights = run / "checkpoints" / "step_2" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    from opdcli.errors import ModelError

    with pytest.raises(ModelError, match="damaged"):
        _train(tmp_path / "resumed2", f"run.resume={run / 'checkpoints' / 'step_2'}", "train.max_steps=5",
               "eval.enabled=false")


def test_a_failed_save_keeps_the_complete_copy_and_cleans_up(trained, tmp_path, monkeypatch):
    import errno

    from opdcli.run import checkpoint as ck

    run = _copy(trained, tmp_path / "run")
    ckpt = run / "checkpoints" / "step_4"
    before = (ckpt / "model.safetensors").read_bytes()

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok = AutoModelForCausalLM.from_pretrained(ckpt), AutoTokenizer.from_pretrained(ckpt)
    monkeypatch.setattr(ck.torch, "save", full)
    with pytest.raises(CheckpointError, match=r"No space left on device.*newest complete checkpoint is .*step_4"):
        ck.save_checkpoint(run, model, tok, {}, ck.TrainState(step=4), keep=5, final=True)
    assert not list((run / "checkpoints").glob(".tmp_*"))
    assert ck.is_complete(ckpt) and (ckpt / "model.safetensors").read_bytes() == before
    monkeypatch.undo()
    out = ck.save_checkpoint(run, model, tok, {}, ck.TrainState(step=4), keep=5, final=True)
    assert ck.is_complete(out) and (run / "checkpoints" / "latest").read_text().strip() == "step_4"
    assert not list((run / "checkpoints").glob(".old_*"))


def test_a_really_full_disk_gives_one_line_and_no_temporary_files(trained, tmp_path):
    """A 1 MB tmpfs (needs root and mount; skipped elsewhere) cannot hold the toy checkpoint."""
    from opdcli.run import checkpoint as ck

    small = tmp_path / "small"
    small.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(small)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        src = trained / "checkpoints" / "step_4"
        model, tok = AutoModelForCausalLM.from_pretrained(src), AutoTokenizer.from_pretrained(src)
        blob = torch.load(src / "trainer_state.pt", weights_only=False)
        with pytest.raises(CheckpointError, match="cannot write checkpoint") as err:
            ck.save_checkpoint(small, model, tok, blob["optimizer"], ck.TrainState(step=4), keep=2)
        assert "\n" not in str(err.value)
        assert not list((small / "checkpoints").glob(".tmp_*"))
    finally:
        import gc

        gc.collect()  # a writer's file object held by the failed save's traceback
        if subprocess.run(["umount", str(small)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(small)], check=False)


# -- two writers ---------------------------------------------------------------------------------

def test_a_second_writer_is_refused(tmp_path):
    from opdcli.run.rundir import lock_run_dir

    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pathlib import Path; from opdcli.run.rundir import lock_run_dir; "
        f"lock_run_dir(Path({str(run)!r})); print('locked', flush=True); time.sleep(60)")],
        cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ConfigError, match=rf"in use by another opd process \(pid {holder.pid}\)"):
            _train(run, "train.max_steps=1", "run.overwrite=true", "eval.enabled=false")
        assert not (run / "metrics.jsonl").exists()  # nothing of the holder's was touched
    finally:
        holder.kill()
        holder.wait()
    fd = lock_run_dir(run)  # released with its process
    os.close(fd)


def test_the_lock_is_released_after_a_run_and_after_a_failed_one(tmp_path):
    run = tmp_path / "run"
    _train(run, "train.max_steps=1", "eval.enabled=false")
    with pytest.raises(ConfigError, match="already holds a run"):
        _train(run, "train.max_steps=1", "eval.enabled=false")
    _train(run, "train.max_steps=1", "eval.enabled=false", "run.overwrite=true")


# -- config changes on resume -------------------------------------------------------------------

def test_resume_with_another_config_is_refused_unless_allowed(tmp_path):
    run = tmp_path / "run"
    _train(run, "train.max_steps=2", "eval.enabled=false")
    with pytest.raises(ConfigError, match=r"optim.lr 0.0015 -> 0.5.*run.allow_config_change=true"):
        _train(run, f"run.resume={run}", "train.max_steps=3", "optim.lr=0.5", "eval.enabled=false")
    with pytest.raises(ConfigError, match=r"loss.objective 'rkl' -> 'fkl'"):
        _train(run, f"run.resume={run}", "train.max_steps=3", "loss.objective=fkl", "eval.enabled=false")
    assert "lr: 0.0015" in (run / "config.yaml").read_text()  # not overwritten by a refused resume
    _train(run, f"run.resume={run}", "train.max_steps=3", "optim.lr=0.5", "eval.enabled=false",
           "run.allow_config_change=true")
    change = json.loads((run / "config_changes.jsonl").read_text().splitlines()[-1])
    assert change["changes"]["optim.lr"] == [0.0015, 0.5] and change["step"] == 2
    # changing only how long it runs and how it logs needs nothing
    _train(run, f"run.resume={run}", "train.max_steps=4", "optim.lr=0.5", "eval.enabled=false",
           "train.rollouts_every=2")


# -- Ctrl-C -----------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_stop_signal_saves_a_checkpoint_and_says_how_to_resume(tmp_path, signum):
    run = tmp_path / "run"
    proc = subprocess.Popen(_cli("train", *_sets(run, "train.max_steps=500", "eval.enabled=false")),
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _wait_for_steps(run, 3, proc)
    logged = sum('"loss/total"' in line for line in (run / "metrics.jsonl").read_text().splitlines())
    proc.send_signal(signum)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out[-2000:]
    assert "Traceback" not in out
    assert "stopping after this step" in out
    assert "interrupted at step" in out and f"run.resume={run}" in out
    latest = (run / "checkpoints" / "latest").read_text().strip()
    step = int(latest[5:])
    assert 3 <= logged <= step <= logged + 2  # the step in flight finishes, then the run stops
    steps = [r["progress/step"] for r in read_metrics(run / "metrics.jsonl") if "loss/total" in r]
    assert steps[-1] == step
    if signum == signal.SIGTERM:
        return
    _train(run, f"run.resume={run}", f"train.max_steps={step + 1}", "eval.enabled=false")


@pytest.mark.slow
def test_ctrl_c_stops_opd_distill_after_the_step_with_a_checkpoint(tmp_path):
    run = tmp_path / "run"
    args = ["distill", "--config", str(ROOT / "configs/toy/distill.yaml")]
    for s in (f"run.out_dir={run}", "train.max_steps=500", "eval.enabled=false", "rollout.prompts_per_step=4"):
        args += ["--set", s]
    proc = subprocess.Popen(_cli(*args), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _wait_for_steps(run, 3, proc)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out[-2000:]
    assert "Traceback" not in out and "interrupted at step" in out
    step = int((run / "checkpoints" / "latest").read_text().strip()[5:])
    steps = [r["progress/step"] for r in read_metrics(run / "metrics.jsonl") if "loss/total" in r]
    assert 3 <= step < 500 and steps[-1] == step


def test_the_first_stop_signal_waits_for_the_step_boundary_and_a_second_stops_at_once():
    from opdcli.dist import Dist
    from opdcli.run.interrupt import StopOnSignal

    before = signal.getsignal(signal.SIGINT)
    with StopOnSignal(Dist()) as stop:
        stop.check()  # no signal yet: nothing happens
        os.kill(os.getpid(), signal.SIGTERM)  # delivered to the handler, which only sets the flag
        time.sleep(0.05)
        assert stop.requested == signal.SIGTERM
        with pytest.raises(KeyboardInterrupt):
            stop.check()
        with pytest.raises(KeyboardInterrupt):  # a second signal raises where the code stands
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.5)
    assert signal.getsignal(signal.SIGINT) is before  # the handlers are given back


# -- non-finite signals and updates -------------------------------------------------------------

def _broken_teacher(tmp: Path, scale: float) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from opdcli.models import resolve_model_path

    src = resolve_model_path("toy:teacher")
    model = AutoModelForCausalLM.from_pretrained(src)
    with torch.no_grad():  # the final norm's gain scales every logit: inf gives NaN log-probs
        model.model.norm.weight.mul_(scale)
    model.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(src).save_pretrained(tmp)
    return tmp


@pytest.mark.parametrize("scale, source", [(float("inf"), "teacher log-probs"), (1e30, "")],
                         ids=["inf-teacher", "huge-teacher"])
def test_a_non_finite_teacher_stops_the_run_with_its_source(tmp_path, scale, source):
    teacher = _broken_teacher(tmp_path / "teacher", scale)
    with pytest.raises(NonFiniteError, match=f"step 1: non-finite {source}") as err:
        _train(tmp_path / "run", f"model.teacher={teacher}", "train.max_steps=3", "eval.enabled=false")
    assert "train.on_nonfinite=skip" in str(err.value)
    assert not list((tmp_path / "run").glob("checkpoints/step_*"))


def test_skip_counts_non_finite_steps_and_leaves_the_student_unchanged(tmp_path):
    from safetensors.torch import load_file

    from opdcli.models import resolve_model_path

    teacher = _broken_teacher(tmp_path / "teacher", float("inf"))
    _train(tmp_path / "run", f"model.teacher={teacher}", "train.max_steps=3", "eval.enabled=false",
           "train.on_nonfinite=skip")
    rows = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "progress/step" in r and "time/score" in r]
    assert [r["train/skipped_steps"] for r in rows] == [1.0, 2.0, 3.0]
    after = load_file(str(tmp_path / "run" / "checkpoints" / "step_3" / "model.safetensors"))
    init = load_file(str(Path(resolve_model_path("toy:student")) / "model.safetensors"))
    assert all(torch.equal(after[k], init[k]) for k in after if k in init)


@pytest.mark.parametrize("lr, needle", [("-1e-3", "optim.lr is -0.001"), ("nan", "optim.lr is nan")])
def test_bad_learning_rates_are_refused(tmp_path, lr, needle):
    with pytest.raises(ConfigError, match=needle):
        _train(tmp_path / "run", f"optim.lr={lr}", "train.max_steps=1")


def test_negative_cadences_are_refused(tmp_path):
    for key in ("train.save_every=-1", "train.keep_checkpoints=-2"):
        with pytest.raises(ConfigError, match="must be >= 0"):
            _train(tmp_path / "run", key, "train.max_steps=1")


def test_a_student_that_never_changes_is_a_warning(tmp_path, capsys):
    _train(tmp_path / "run", "optim.lr=0", "optim.warmup_steps=0", "train.max_steps=10", "eval.enabled=false")
    got = capsys.readouterr()
    assert "has not changed for 10 steps" in " ".join((got.out + got.err).split())


# -- prompts beyond the context -----------------------------------------------------------------

@pytest.mark.parametrize("chars", [3000, 2_000_000])
def test_a_prompt_beyond_the_context_is_refused_before_sampling(tmp_path, chars):
    data = tmp_path / "prompts.jsonl"
    data.write_text(json.dumps({"prompt": "1+2=" * (chars // 4), "answer": "3"}) + "\n")
    start = time.perf_counter()
    with pytest.raises(DataError, match=r"prompt 0 has .*tokens; with rollout.max_new_tokens=16 that exceeds "
                                        r"the model's context of 1024"):
        _train(tmp_path / "run", f"data.source={data}", "train.max_steps=1", "eval.enabled=false")
    assert time.perf_counter() - start < 60


def test_a_huge_learning_rate_is_never_silent(tmp_path, capsys):
    """lr 1e3: a warning at config time, then either a collapse warning or a stop on a
    non-finite update; never a quiet exit 0 with a broken student."""
    with pytest.warns(UserWarning, match="far above any usual range"):
        try:
            _train(tmp_path / "run", "optim.lr=1000", "optim.warmup_steps=0", "train.max_steps=6",
                   "eval.enabled=false")
        except NonFiniteError:
            return
    got = capsys.readouterr()
    assert "training has likely diverged" in " ".join((got.out + got.err).split())
