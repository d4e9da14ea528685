"""The teacher behind a vLLM endpoint (vllm.teacher_url), against a stand-in server that speaks
vLLM's OpenAI-compatible JSON (routes /v1/models, /tokenize, /v1/completions with
prompt_logprobs; token ids as string keys; a null first entry; its --max-logprobs and
max_model_len limits; its error bodies) and computes the log-probs with a transformers teacher.
No vLLM needed; against a real `vllm serve`: tests/test_vllm_real.py."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from opdcli.config import TrainRunConfig, load_config
from opdcli.errors import ConfigError, EngineError

ROOT = Path(__file__).resolve().parents[1]


class FakeVLLM:
    """A vLLM-shaped server around a transformers `teacher`; `fail_next` 503s, `tokenize_shift`
    makes its tokenizer disagree."""

    def __init__(self, teacher, tokenizer, name: str, root: str, *, max_logprobs: int = 20, max_model_len: int = 512):
        self.teacher, self.tokenizer, self.name, self.root = teacher.eval(), tokenizer, name, root
        self.max_logprobs, self.max_model_len = max_logprobs, max_model_len
        self.fail_next, self.tokenize_shift, self.completions = 0, 0, 0
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, code, body):
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._send(200, {"object": "list", "data": [{"id": fake.name, "root": fake.root,
                                                             "max_model_len": fake.max_model_len}]})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                self._send(*fake.answer(self.path, body))

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def answer(self, path, body):
        if body.get("model") != self.name:
            return 404, {"error": {"message": f"The model `{body.get('model')}` does not exist.", "code": 404}}
        if path == "/tokenize":
            ids = self.tokenizer(body["prompt"], add_special_tokens=body["add_special_tokens"])["input_ids"]
            return 200, {"count": len(ids), "max_model_len": self.max_model_len,
                         "tokens": [i + self.tokenize_shift for i in ids]}
        self.completions += 1
        if self.fail_next:
            self.fail_next -= 1
            return 503, {"error": {"message": "overloaded", "code": 503}}
        k = body["prompt_logprobs"]
        if k > self.max_logprobs:
            return 400, {"error": {"message": f"Requested prompt logprobs of {k}, which is greater than max "
                                              f"allowed: {self.max_logprobs}", "code": 400}}
        ids = body["prompt"]
        with torch.no_grad():
            lp = self.teacher(torch.tensor([ids])).logits[0].float().log_softmax(-1)
        entries = [None]
        for j in range(1, len(ids)):
            row = lp[j - 1]
            order = row.argsort(descending=True).tolist()
            rank = {t: r + 1 for r, t in enumerate(order)}
            d = {str(t): {"logprob": float(row[t]), "rank": rank[t], "decoded_token": "?"} for t in order[:k]}
            d[str(ids[j])] = {"logprob": float(row[ids[j]]), "rank": rank[ids[j]], "decoded_token": "?"}
            entries.append(d)
        return 200, {"choices": [{"index": 0, "text": "x", "prompt_logprobs": entries}]}

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake(tiny_dirs, toy_tokenizer):
    from transformers import AutoModelForCausalLM

    server = FakeVLLM(AutoModelForCausalLM.from_pretrained(tiny_dirs["teacher"]), toy_tokenizer, "the-teacher",
                      str(tiny_dirs["teacher"]))
    yield server
    server.close()


def _cfg(fake, *sets):
    cfg, _ = load_config(TrainRunConfig, None, ["scoring.teacher_engine=vllm", "loss.objective=sampled",
                                                f"vllm.teacher_url={fake.url}", "model.teacher=the-teacher",
                                                "scoring.top_k=8", "vllm.request_timeout_s=20", *sets])
    return cfg


def test_endpoint_scores_equal_the_transformers_teachers(fake, tiny_dirs, toy_tokenizer):
    from transformers import AutoModelForCausalLM

    from opdcli.engines.hf_sampler import HFSampler
    from opdcli.engines.hf_scorer import HFScorer
    from opdcli.engines.types import SamplingParams
    from opdcli.engines.vllm_endpoint import TeacherEndpoint
    from opdcli.engines.vllm_scorer import VLLMTeacherScorer

    student = AutoModelForCausalLM.from_pretrained(tiny_dirs["student"])
    teacher = AutoModelForCausalLM.from_pretrained(tiny_dirs["teacher"])
    texts = ["<|im_start|>user\nCompute 3+4.<|im_end|>\n<|im_start|>assistant\n", "Q: 12-5?"]  # unequal prompts
    batch = HFSampler(student, toy_tokenizer, generator=torch.Generator().manual_seed(0)).sample(
        texts, SamplingParams(n=3, temperature=1.0, max_new_tokens=12))
    ref = HFScorer(student, teacher, k=8, chunk_tokens=64, batch_size=8).score(batch)
    ep = TeacherEndpoint.connect(_cfg(fake), toy_tokenizer)
    assert ep.model == "the-teacher" and ep.max_model_len == 512
    ours = VLLMTeacherScorer(HFScorer(student, None, k=8, chunk_tokens=64, batch_size=8), ep, k=8,
                             vocab_size=student.config.vocab_size).score(batch)
    m = batch.response_mask_B_T > 0
    assert int(m.sum()) > 20 and bool((~m).any())  # some padding, which must stay zero
    assert (ours.teacher_lp_B_T[m] - ref.teacher_lp_B_T[m]).abs().max() < 1e-5
    assert (ours.teacher_topk_lp_B_T_K[m] - ref.teacher_topk_lp_B_T_K[m]).abs().max() < 1e-5
    assert torch.equal(ours.teacher_topk_ids_B_T_K[m], ref.teacher_topk_ids_B_T_K[m])
    assert float(ours.teacher_lp_B_T[~m].abs().max()) == 0.0


def test_the_served_folder_matches_model_teacher_too(fake, tiny_dirs, toy_tokenizer):
    from opdcli.engines.vllm_endpoint import TeacherEndpoint

    ep = TeacherEndpoint.connect(_cfg(fake, f"model.teacher={tiny_dirs['teacher']}"), toy_tokenizer)
    assert ep.model == "the-teacher"


def test_transient_failures_are_retried_and_client_errors_are_not(fake, toy_tokenizer):
    from opdcli.engines.vllm_endpoint import TeacherEndpoint

    ep = TeacherEndpoint.connect(_cfg(fake, "vllm.request_retries=2"), toy_tokenizer)
    fake.fail_next, before = 2, fake.completions
    assert len(ep.prompt_logprobs([[5, 6, 7]], 4)[0]) == 3
    assert fake.completions - before == 3
    fake.fail_next = 3
    with pytest.raises(EngineError, match="answered 503: overloaded"):
        ep.prompt_logprobs([[5, 6, 7]], 4)
    fake.fail_next, before = 0, fake.completions
    with pytest.raises(EngineError, match="greater than max allowed: 20"):
        ep.prompt_logprobs([[5, 6, 7]], 21)
    assert fake.completions - before == 1
    with pytest.raises(EngineError, match="exceeds the teacher endpoint's max_model_len"):
        ep.prompt_logprobs([[5] * 600], 4)


def test_endpoint_refusals_before_any_model_loads(fake, toy_tokenizer):
    from opdcli.engines.vllm_endpoint import TeacherEndpoint

    with pytest.raises(ConfigError, match="serves the-teacher .* not model.teacher=other"):
        TeacherEndpoint.connect(_cfg(fake, "model.teacher=other"), toy_tokenizer)
    with pytest.raises(ConfigError, match="--max-logprobs 32"):
        TeacherEndpoint.connect(_cfg(fake, "scoring.top_k=32"), toy_tokenizer)
    with pytest.raises(ConfigError, match="max_model_len \\(512\\) leaves no room"):
        TeacherEndpoint.connect(_cfg(fake, "rollout.max_new_tokens=600"), toy_tokenizer)
    fake.tokenize_shift = 1
    with pytest.raises(ConfigError, match="tokenizes differently from the student"):
        TeacherEndpoint.connect(_cfg(fake), toy_tokenizer)
    fake.close()
    with pytest.raises(EngineError, match="cannot be reached .* after 1 tries"):
        TeacherEndpoint.connect(_cfg(fake, "vllm.request_retries=0"), toy_tokenizer)


@pytest.mark.parametrize(("sets", "match"), [
    (["vllm.teacher_url=http://h:1"], "vllm.teacher_url cannot take effect: no vLLM engine runs"),
    (["scoring.teacher_engine=vllm", "loss.objective=sampled", "vllm.teacher_url=h:1"], "give the server's address"),
    (["scoring.teacher_engine=vllm", "loss.objective=sampled", "vllm.request_retries=1"], "applies to the teacher"),
    (["scoring.teacher_engine=vllm", "loss.objective=sampled", "vllm.teacher_url=http://h:1",
      "vllm.kv_cache_space_gb=2"], "no in-process vLLM engine runs"),
    (["scoring.teacher_engine=vllm", "loss.objective=sampled", "vllm.teacher_url=http://h:1",
      "vllm.max_concurrent_requests=0"], "max_concurrent_requests >= 1"),
])
def test_endpoint_config_refusals(sets, match):
    from opdcli.validate import validate_common

    cfg, explicit = load_config(TrainRunConfig, None, sets)
    with pytest.raises(ConfigError, match=match):
        validate_common(cfg, explicit)


def test_opd_train_scores_with_the_endpoint_and_the_student_moves(fake, tiny_dirs, tmp_path):
    from transformers import AutoModelForCausalLM

    from opdcli.loops.train import run_train
    from opdcli.records.io import read_records

    sets = [f"run.out_dir={tmp_path / 'run'}", "scoring.teacher_engine=vllm", "loss.objective=sampled",
            f"vllm.teacher_url={fake.url}", "model.teacher=the-teacher", f"model.student={tiny_dirs['student']}",
            "rollout.prompts_per_step=4", "rollout.max_new_tokens=12", "train.max_steps=2", "eval.enabled=false",
            "train.rollouts_every=1", "optim.lr=1e-2"]
    cfg, explicit = load_config(TrainRunConfig, ROOT / "configs/toy/opd.yaml", sets)
    before = fake.completions
    assert run_train(cfg, explicit, ["opd", "train"]).steps == 2
    records = list(read_records(tmp_path / "run" / "rollouts.jsonl"))
    assert records and all(len(r.teacher_lp) == len(r.response_ids) for r in records)
    assert fake.completions - before >= 2 * 4 * cfg.rollout.samples_per_prompt  # every row of both steps
    start = AutoModelForCausalLM.from_pretrained(tiny_dirs["student"])
    end = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "checkpoints" / "step_2")
    assert max(float((a - b).detach().abs().max()) for a, b in zip(start.parameters(), end.parameters(),
                                                                  strict=True)) > 1e-5
