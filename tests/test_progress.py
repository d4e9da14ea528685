"""Long commands show progress: opd rollout and opd eval (hf) draw a rich bar with tokens/s,
opd sweep says which run it is on and how it ended; written to a log file (not a terminal),
each bar appears once, finished, instead of one line per update."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from opdcli.loops.sweep import run_sweep

OPD = [sys.executable, "-c", "from opdcli.cli import main; main()"]


def _run(args: list[str], tmp_path: Path) -> str:
    log = tmp_path / "stderr.log"
    with log.open("w") as err:  # a file: what a cluster job's log sees
        proc = subprocess.run([*OPD, *args], stdout=subprocess.PIPE, stderr=err, text=True, timeout=600,
                              env={**os.environ, "COLUMNS": "120"})
    text = log.read_text()
    assert proc.returncode == 0, text[-2000:]
    return text


def test_rollout_shows_one_finished_bar_with_the_token_rate(tmp_path):
    text = _run(["rollout", "--out", str(tmp_path / "r.jsonl"), "--n", "2", "--max-new-tokens", "16",
                 "--set", "data.max_prompts=12", "--set", "rollout.prompts_per_step=4"], tmp_path)
    bars = [line for line in text.splitlines() if "opd rollout (prompts)" in line]
    assert len(bars) == 1, text
    assert "12/12" in bars[0] and "tokens/s" in bars[0]


def test_eval_hf_shows_one_finished_bar_with_the_token_rate(tmp_path):
    text = _run(["eval", "--bench", "toy-arith", "--model", "toy:student", "--generator", "hf", "--limit", "24",
                 "--out", str(tmp_path / "eval")], tmp_path)
    bars = [line for line in text.splitlines() if "generating (toy:student)" in line]
    assert len(bars) == 1, text
    assert "24/24" in bars[0] and "tokens/s" in bars[0]


def test_sweep_says_which_run_it_is_on(tmp_path):
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(f"""
base: {Path(__file__).parents[1] / 'configs' / 'toy' / 'opd.yaml'}
out_dir: {tmp_path / 'sweep'}
seeds: [0]
set: ["train.max_steps=1", "rollout.prompts_per_step=2", "rollout.samples_per_prompt=1", "eval.size=4",
      "rollout.max_new_tokens=8"]
methods:
  - name: opd
  - name: prune
""")
    lines: list[str] = []
    from opdcli.loops.train import run_train

    run_sweep(sweep, ["test"], train=run_train, echo=lines.append)
    assert lines[0].startswith("[1/2] opd seed 0: training -> ")
    assert lines[1].startswith("[1/2] opd seed 0: held-out accuracy ") and lines[1].endswith(" s")
    assert lines[2].startswith("[2/2] prune seed 0: training") and lines[3].startswith("[2/2] prune seed 0: held-out")
