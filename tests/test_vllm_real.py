"""The vLLM rollout engine against real vLLM (`make test-vllm`; skipped where vLLM is absent).

In-process engines (VLLM_ENABLE_V1_MULTIPROCESSING=0) on tiny Qwen3-architecture models whose
head size vLLM's CPU backend runs (32). Checked: greedy rollouts equal the hf engine's token for
token; sampled rollouts' behaviour log-probs equal a transformers forward's log-softmax; a weight
push changes generation exactly as the same update changes the hf engine's; `opd train` and
`opd distill` run with rollout.engine=vllm and the student improves its loss.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

if os.environ.get("OPD_REQUIRE_VLLM"):  # make test-vllm: a broken install fails instead of skipping
    import vllm
else:
    vllm = pytest.importorskip("vllm")
pytestmark = pytest.mark.vllm

ROOT = Path(__file__).resolve().parents[1]
TEXTS = ["<|im_start|>user\nCompute 3+4.<|im_end|>\n<|im_start|>assistant\n",
         "<|im_start|>user\nCompute 12-5.<|im_end|>\n<|im_start|>assistant\n"]


@pytest.fixture(scope="module")
def engine():
    """The engine on the shipped toy teacher (trained, so greedy argmaxes are not near-ties)."""
    from transformers import AutoModelForCausalLM

    from opdcli.config import VLLMConfig
    from opdcli.engines.vllm_engine import VLLMSampler
    from opdcli.models import resolve_model_path
    from opdcli.toy.tokenizer import build_toy_tokenizer

    path = resolve_model_path("toy:teacher")
    module = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return VLLMSampler(path, build_toy_tokenizer(), VLLMConfig(), module=module, dtype="float32", seed=0,
                       max_model_len=256)


def _hf(module, tok):
    from opdcli.engines.hf_sampler import HFSampler

    return HFSampler(module, tok, generator=torch.Generator().manual_seed(0))


def test_greedy_rollouts_equal_the_hf_engines(engine):
    from opdcli.engines.types import SamplingParams

    params = SamplingParams(n=1, temperature=0.0, max_new_tokens=24)
    ours, theirs = engine.sample(TEXTS, params), _hf(engine.model, engine.tokenizer).sample(TEXTS, params)
    assert torch.equal(ours.response_mask_B_T, theirs.response_mask_B_T)
    assert torch.equal(ours.response_ids_B_T * ours.response_mask_B_T, theirs.response_ids_B_T * theirs.response_mask_B_T)
    assert torch.equal(ours.input_ids_B_L[:, :ours.prompt_len], theirs.input_ids_B_L[:, :theirs.prompt_len])


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampled_behaviour_log_probs_equal_a_transformers_forward(engine, temperature):
    from opdcli.engines.hf_sampler import process_logits
    from opdcli.engines.types import SamplingParams

    batch = engine.sample(TEXTS, SamplingParams(n=4, temperature=temperature, max_new_tokens=16))
    assert batch.batch_size == 8 and int(batch.response_mask_B_T.sum()) > 8
    with torch.no_grad():
        logits = engine.model(input_ids=batch.input_ids_B_L, attention_mask=batch.attention_mask_B_L,
                              position_ids=(batch.attention_mask_B_L.cumsum(-1) - 1).clamp(min=0)).logits
    P, T = batch.prompt_len, batch.response_len
    lsm = process_logits(logits[:, P - 1:P - 1 + T].reshape(-1, logits.shape[-1]), temperature, 1.0, 0).log_softmax(-1)
    want = lsm.gather(-1, batch.response_ids_B_T.reshape(-1, 1)).reshape(batch.response_ids_B_T.shape)
    m = batch.response_mask_B_T > 0
    assert (batch.behavior_lp_B_T[m] - want[m]).abs().max() < 1e-4


def test_a_weight_push_changes_generation_as_the_hf_update_does(engine):
    from opdcli.engines.types import SamplingParams

    params = SamplingParams(n=1, temperature=0.0, max_new_tokens=24)
    before = engine.sample(TEXTS, params)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in engine.model.parameters():
            p.add_(0.5 * p.std() * torch.randn(p.shape, generator=g))
    engine.sync_weights(None, 1)
    after, hf_after = engine.sample(TEXTS, params), _hf(engine.model, engine.tokenizer).sample(TEXTS, params)
    assert not torch.equal(after.response_ids_B_T, before.response_ids_B_T) or \
        after.response_len != before.response_len
    assert torch.equal(after.response_mask_B_T, hf_after.response_mask_B_T)
    assert torch.equal(after.response_ids_B_T * after.response_mask_B_T,
                       hf_after.response_ids_B_T * hf_after.response_mask_B_T)
    assert after.version_B.tolist() == [1, 1] and engine.weight_pushes >= 1


def _rkl_to_teacher(student_dir) -> float:
    """Mean per-token KL(student || teacher), the objective, on fixed sequences: answers the
    initial toy student sampled (seeded) to 16 toy prompts."""
    from transformers import AutoModelForCausalLM

    from opdcli.config import DataConfig
    from opdcli.data import PromptSource, render
    from opdcli.engines.types import SamplingParams
    from opdcli.models import resolve_model_path
    from opdcli.toy.tokenizer import build_toy_tokenizer

    tok = build_toy_tokenizer()
    teacher = AutoModelForCausalLM.from_pretrained(resolve_model_path("toy:teacher"))
    student = AutoModelForCausalLM.from_pretrained(student_dir)
    prompts = [render(tok, p) for p in PromptSource(DataConfig(source="toy"), 123).next_batch(16)]
    start = AutoModelForCausalLM.from_pretrained(resolve_model_path("toy:student"))
    batch = _hf(start, tok).sample(prompts, SamplingParams(n=2, temperature=1.0, max_new_tokens=48))
    with torch.no_grad():
        kw = dict(input_ids=batch.input_ids_B_L, attention_mask=batch.attention_mask_B_L,
                  position_ids=(batch.attention_mask_B_L.cumsum(-1) - 1).clamp(min=0))
        P, T = batch.prompt_len, batch.response_len
        s_lp = student(**kw).logits[:, P - 1:P - 1 + T].log_softmax(-1)
        t_lp = teacher(**kw).logits[:, P - 1:P - 1 + T].log_softmax(-1)
    kl = (s_lp.exp() * (s_lp - t_lp)).sum(-1)
    m = batch.response_mask_B_T > 0
    return float(kl[m].mean())


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_opd_train_on_the_toy_pair_with_the_vllm_engine(tmp_path, mode):
    """The shipped toy pair (both head_dim 32) trains with vLLM rollouts, in both loops; the
    student moves towards the teacher."""
    from opdcli.config import TrainRunConfig, load_config
    from opdcli.models import resolve_model_path

    sets = [f"run.out_dir={tmp_path / 'run'}", "rollout.engine=vllm", "rollout.prompts_per_step=16",
            "train.max_steps=6", "eval.every=0", "eval.size=8", f"train.mode={mode}"]
    if mode == "async":
        from opdcli.loops.train_async import run_train_async as run
        sets += ["asynchronous.workers=1", "asynchronous.buffer=1"]
    else:
        from opdcli.loops.train import run_train as run
    cfg, explicit = load_config(TrainRunConfig, ROOT / "configs/toy/opd.yaml", sets)
    result = run(cfg, explicit, ["opd", "train"])
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss/total" in r]
    assert result.steps == 6 and len(steps) == 6 and all(r["rollout/tokens"] > 0 for r in steps)
    final = tmp_path / "run" / "checkpoints" / "step_6"
    before, after = _rkl_to_teacher(resolve_model_path("toy:student")), _rkl_to_teacher(final)
    assert after < before


def test_opd_distill_teacher_traces_with_the_vllm_engine(tmp_path):
    from opdcli.config import DistillRunConfig, load_config
    from opdcli.loops.distill import run_distill

    sets = [f"run.out_dir={tmp_path / 'd'}", "rollout.engine=vllm", "distill.traces=teacher",
            "rollout.prompts_per_step=8", "rollout.samples_per_prompt=1", "train.max_steps=2", "eval.every=0",
            "eval.size=8"]
    cfg, explicit = load_config(DistillRunConfig, ROOT / "configs/toy/distill.yaml", sets)
    result = run_distill(cfg, explicit, ["opd", "distill"])
    rows = [json.loads(line) for line in (tmp_path / "d" / "metrics.jsonl").read_text().splitlines()]
    assert result.steps == 2 and any("time/sample" in r for r in rows)


def test_teacher_scoring_on_vllm_equals_transformers():
    from transformers import AutoModelForCausalLM

    from opdcli.config import VLLMConfig
    from opdcli.engines.hf_scorer import HFScorer
    from opdcli.engines.types import SamplingParams
    from opdcli.engines.vllm_engine import build_llm
    from opdcli.engines.vllm_scorer import InProcessTeacher, VLLMTeacherScorer
    from opdcli.models import resolve_model_path
    from opdcli.toy.tokenizer import build_toy_tokenizer

    tok = build_toy_tokenizer()
    student = AutoModelForCausalLM.from_pretrained(resolve_model_path("toy:student"))
    teacher = AutoModelForCausalLM.from_pretrained(resolve_model_path("toy:teacher"))
    batch = _hf(student, tok).sample(TEXTS, SamplingParams(n=4, temperature=1.0, max_new_tokens=32))
    ref = HFScorer(student, teacher, k=8, chunk_tokens=64, batch_size=8).score(batch)
    llm = build_llm(resolve_model_path("toy:teacher"), VLLMConfig(), device_type="cpu", dtype="float32", seed=0,
                    max_model_len=256, max_logprobs=8)
    ours = VLLMTeacherScorer(HFScorer(student, None, k=8, chunk_tokens=64, batch_size=8),
                             InProcessTeacher(llm, vllm.SamplingParams), k=8).score(batch)
    m = batch.response_mask_B_T > 0
    assert int(m.sum()) > 20
    assert (ours.teacher_lp_B_T[m] - ref.teacher_lp_B_T[m]).abs().max() < 1e-4
    assert (ours.teacher_topk_lp_B_T_K[m] - ref.teacher_topk_lp_B_T_K[m]).abs().max() < 1e-4
    same = (ours.teacher_topk_ids_B_T_K[m] == ref.teacher_topk_ids_B_T_K[m]).float().mean()
    assert same > 0.99  # ids may swap only where two log-probs tie to 1e-4
    assert torch.equal(ours.student_lp_B_T, ref.student_lp_B_T) and ours.teacher_lp_on_student_topk_B_T_K is None


def test_opd_train_with_a_vllm_teacher_and_vllm_rollouts(tmp_path):
    from transformers import AutoModelForCausalLM

    from opdcli.config import TrainRunConfig, load_config
    from opdcli.loops.train import run_train
    from opdcli.models import resolve_model_path
    from opdcli.records.io import read_records

    sets = [f"run.out_dir={tmp_path / 'run'}", "rollout.engine=vllm", "scoring.teacher_engine=vllm",
            "loss.objective=sampled", "rollout.prompts_per_step=16", "train.max_steps=3", "eval.every=0",
            "eval.size=8", "train.rollouts_every=1"]
    cfg, explicit = load_config(TrainRunConfig, ROOT / "configs/toy/opd.yaml", sets)
    result = run_train(cfg, explicit, ["opd", "train"])
    assert result.steps == 3
    records = list(read_records(tmp_path / "run" / "rollouts.jsonl"))
    assert records and all(r.teacher_lp_on_student_topk is None and r.teacher_topk_ids for r in records)
    start = AutoModelForCausalLM.from_pretrained(resolve_model_path("toy:student"))
    end = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "checkpoints" / "step_3")
    moved = max(float((a - b).detach().abs().max()) for a, b in zip(start.parameters(), end.parameters(), strict=True))
    assert moved > 1e-5


def test_opd_rollout_with_vllm_engines(tmp_path):
    from opdcli.config import TrainRunConfig, load_config
    from opdcli.loops.rollout import run_rollout
    from opdcli.records.io import read_records

    sets = ["rollout.engine=vllm", "scoring.teacher_engine=vllm", "loss.objective=sampled",
            "rollout.prompts_per_step=8", "rollout.samples_per_prompt=2"]
    cfg, explicit = load_config(TrainRunConfig, ROOT / "configs/toy/opd.yaml", sets)
    result = run_rollout(cfg, tmp_path / "r.jsonl", overrides=set(sets))
    records = list(read_records(tmp_path / "r.jsonl"))
    assert result.records == 16 == len(records)
    assert all(len(r.teacher_lp) == len(r.response_ids) > 0 for r in records)


def test_online_truncation_in_chunks_stops_where_the_rule_says():
    """Prune-OPD's online stop on vLLM: every stopped row has reached the rule's event limit within
    its last chunk, every other row ended by EOS or budget below the limit (events recomputed with
    the transformers teacher on the engine's tokens)."""
    import math

    from transformers import AutoModelForCausalLM

    from opdcli.config import VLLMConfig
    from opdcli.engines.types import GenerationControl, SamplingParams
    from opdcli.engines.vllm_engine import VLLMSampler
    from opdcli.methods.drift import top_p_accept_events
    from opdcli.methods.prune_online import DriftStopRule
    from opdcli.models import resolve_model_path
    from opdcli.toy.tokenizer import build_toy_tokenizer

    path = resolve_model_path("toy:student")  # the weak student samples, the teacher judges
    teacher = AutoModelForCausalLM.from_pretrained(resolve_model_path("toy:teacher")).eval()
    engine = VLLMSampler(path, build_toy_tokenizer(), VLLMConfig(), module=AutoModelForCausalLM.from_pretrained(path),
                         dtype="float32", seed=0, max_model_len=256, follower=teacher)
    rule = DriftStopRule(k=4, theta=0.9, w_drop=0.34, chunk=4, metric="teacher_top_p_accept")
    batch = engine.sample(TEXTS, SamplingParams(n=8, temperature=1.0, max_new_tokens=40),
                          control=GenerationControl(40, stop=rule))
    limit = math.ceil(1 / rule.w_drop - 1e-9)
    with torch.no_grad():
        kw = dict(input_ids=batch.input_ids_B_L, attention_mask=batch.attention_mask_B_L,
                  position_ids=(batch.attention_mask_B_L.cumsum(-1) - 1).clamp(min=0))
        P, T = batch.prompt_len, batch.response_len
        t_lp = engine.follower(**kw).logits[:, P - 1:P - 1 + T].float().log_softmax(-1)
    top_lp, top_ids = t_lp.topk(rule.k, dim=-1)
    events = top_p_accept_events(batch.response_ids_B_T, top_ids, top_lp, rule.theta) & (batch.response_mask_B_T > 0)
    lengths = batch.response_mask_B_T.sum(-1)
    assert batch.stopped_B is not None and bool(batch.stopped_B.any())
    for b in range(batch.batch_size):
        n, total = int(lengths[b]), int(events[b].sum())
        if batch.stopped_B[b]:
            last_chunk_start = ((n - 1) // rule.chunk) * rule.chunk
            assert total >= limit and int(events[b, :last_chunk_start].sum()) < limit
        else:
            assert total < limit and (bool(batch.finished_B[b]) or n == 40)
    assert batch.follower_tokens > 0


def test_opd_train_prune_online_on_the_vllm_engine(tmp_path):
    from opdcli.config import TrainRunConfig, load_config
    from opdcli.loops.train import run_train

    sets = [f"run.out_dir={tmp_path / 'run'}", "rollout.engine=vllm", "method.name=prune", "method.options.online=true",
            "rollout.prompts_per_step=16", "train.max_steps=3", "eval.every=0", "eval.size=8"]
    cfg, explicit = load_config(TrainRunConfig, ROOT / "configs/toy/opd.yaml", sets)
    assert run_train(cfg, explicit, ["opd", "train"]).steps == 3
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("method/prune/online_teacher_tokens", 0) > 0 for r in rows)


@pytest.fixture(scope="module")
def served_teacher(tmp_path_factory):
    """A real `vllm serve` (the OpenAI-compatible API server) on the toy teacher, in its own
    processes; yields its URL."""
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    from opdcli.models import resolve_model_path

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path_factory.mktemp("serve") / "server.log"
    env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", resolve_model_path("toy:teacher"),
           "--served-model-name", "toy-teacher", "--host", "127.0.0.1", "--port", str(port), "--max-logprobs", "16",
           "--max-model-len", "512", "--dtype", "float32", "--enforce-eager"]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 400
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vllm serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                urllib.request.urlopen(url + "/v1/models", timeout=5).read()
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"vllm serve did not answer in 400 s:\n{log.read_text()[-3000:]}")
                time.sleep(2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_teacher_scoring_through_vllm_serve_equals_transformers(served_teacher):
    from transformers import AutoModelForCausalLM

    from opdcli.config import TrainRunConfig, load_config
    from opdcli.engines.hf_scorer import HFScorer
    from opdcli.engines.types import SamplingParams
    from opdcli.engines.vllm_endpoint import TeacherEndpoint
    from opdcli.engines.vllm_scorer import VLLMTeacherScorer
    from opdcli.models import resolve_model_path
    from opdcli.toy.tokenizer import build_toy_tokenizer

    tok = build_toy_tokenizer()
    student = AutoModelForCausalLM.from_pretrained(resolve_model_path("toy:student"))
    teacher = AutoModelForCausalLM.from_pretrained(resolve_model_path("toy:teacher"))
    batch = _hf(student, tok).sample(TEXTS, SamplingParams(n=4, temperature=1.0, max_new_tokens=32))
    ref = HFScorer(student, teacher, k=8, chunk_tokens=64, batch_size=8).score(batch)
    cfg, _ = load_config(TrainRunConfig, None, ["scoring.teacher_engine=vllm", "loss.objective=sampled",
                                                f"vllm.teacher_url={served_teacher}", "scoring.top_k=8"])
    ep = TeacherEndpoint.connect(cfg, tok)  # model.teacher=toy:teacher matches the folder it serves
    assert ep.model == "toy-teacher" and ep.max_model_len == 512
    ours = VLLMTeacherScorer(HFScorer(student, None, k=8, chunk_tokens=64, batch_size=8), ep, k=8,
                             vocab_size=student.config.vocab_size).score(batch)
    m = batch.response_mask_B_T > 0
    assert int(m.sum()) > 20
    assert (ours.teacher_lp_B_T[m] - ref.teacher_lp_B_T[m]).abs().max() < 1e-4
    assert (ours.teacher_topk_lp_B_T_K[m] - ref.teacher_topk_lp_B_T_K[m]).abs().max() < 1e-4
    assert (ours.teacher_topk_ids_B_T_K[m] == ref.teacher_topk_ids_B_T_K[m]).float().mean() > 0.99


def test_opd_train_with_the_teacher_behind_vllm_serve(served_teacher, tmp_path):
    from transformers import AutoModelForCausalLM

    from opdcli.config import TrainRunConfig, load_config
    from opdcli.loops.train import run_train
    from opdcli.models import resolve_model_path

    sets = [f"run.out_dir={tmp_path / 'run'}", "scoring.teacher_engine=vllm", f"vllm.teacher_url={served_teacher}",
            "model.teacher=toy-teacher", "loss.objective=sampled", "rollout.prompts_per_step=16",
            "train.max_steps=3", "eval.every=0", "eval.size=8"]
    cfg, explicit = load_config(TrainRunConfig, ROOT / "configs/toy/opd.yaml", sets)
    assert run_train(cfg, explicit, ["opd", "train"]).steps == 3
    start = AutoModelForCausalLM.from_pretrained(resolve_model_path("toy:student"))
    end = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "checkpoints" / "step_3")
    moved = max(float((a - b).detach().abs().max()) for a, b in zip(start.parameters(), end.parameters(), strict=True))
    assert moved > 1e-5
