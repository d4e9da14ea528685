"""A teacher behind a running `vllm serve` endpoint (`scoring.teacher_engine=vllm` with
`vllm.teacher_url`): the teacher on other GPUs or nodes, scored over HTTP.

Each row goes to the OpenAI-compatible `/v1/completions` route as its own request, with the row's
prompt + response as token ids, `max_tokens=1` and `prompt_logprobs=K`; requests run
concurrently (`vllm.max_concurrent_requests`) and the server batches them. The answer carries,
for every prompt position, the actual token's log-prob and the K most likely ones, exactly as the
in-process engine's `prompt_logprobs` (JSON keys are the token ids as strings).

`connect` checks the endpoint before any model loads: it answers, it serves `model.teacher`
(by served name or by the folder it was started on), it tokenizes like the student, and its
max_model_len fits the run. Transient failures (connection refused or reset, time-outs, 5xx)
are retried `vllm.request_retries` times with a growing pause; a 4xx is the request's fault and
is reported at once with the server's own message.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from opdcli.errors import ConfigError, EngineError

PROBE = "Q: 12+7*3=? Let me think.\nA: 7*3=21. 12+21=33. The answer is 33."
"""Text both tokenizers must split into the same ids (the student's special tokens are added)."""

Entries = list  # per position: None or {token id: (logprob, rank)}


def _base(url: str) -> str:
    """The server root (without /v1): `vllm serve` answers /v1/completions and /tokenize."""
    url = url.rstrip("/")
    return url[:-3] if url.endswith("/v1") else url


class TeacherEndpoint:
    """`prompt_logprobs` of token-id prompts from a running vLLM server."""

    def __init__(self, url: str, model: str, *, timeout_s: float, concurrency: int, retries: int) -> None:
        self.url, self.model = _base(url), model
        self.timeout_s, self.concurrency, self.retries = timeout_s, concurrency, retries
        self.max_model_len: int | None = None

    # -- HTTP ----------------------------------------------------------------------------------
    def _call(self, route: str, body: dict | None = None) -> dict:
        """One request, retried on transient failures; EngineError with the server's message."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + route, data=data, method="GET" if body is None else "POST",
                                     headers={"Content-Type": "application/json"})
        attempt = 0
        while True:
            try:
                with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                    return json.loads(resp.read())
            except urllib.error.HTTPError as e:
                if e.code < 500 or attempt == self.retries:
                    raise EngineError(f"the teacher endpoint {self.url}{route} answered {e.code}: "
                                      f"{_server_message(e)}") from None
            except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
                if attempt == self.retries:
                    raise EngineError(f"the teacher endpoint {self.url} cannot be reached ({getattr(e, 'reason', e)}) "
                                      f"after {self.retries + 1} tries; start it with `vllm serve TEACHER "
                                      "--max-logprobs K` or fix vllm.teacher_url") from None
            time.sleep(min(0.5 * 2 ** attempt, 8.0))
            attempt += 1

    # -- checks before any model loads -----------------------------------------------------------
    @classmethod
    def connect(cls, cfg: Any, tokenizer: Any) -> TeacherEndpoint:
        """The endpoint of `cfg.vllm.teacher_url`, checked against the run (see the module doc)."""
        v = cfg.vllm
        ep = cls(v.teacher_url, cfg.model.teacher, timeout_s=v.request_timeout_s,
                 concurrency=v.max_concurrent_requests, retries=v.request_retries)
        served = ep._call("/v1/models").get("data", [])
        ep.model = ep._served_name(served, cfg.model.teacher)
        ep.max_model_len = next(int(m["max_model_len"]) for m in served if m["id"] == ep.model)
        if ep.max_model_len <= cfg.rollout.max_new_tokens:
            raise ConfigError(f"the teacher endpoint's max_model_len ({ep.max_model_len}) leaves no room for a "
                              f"prompt and rollout.max_new_tokens ({cfg.rollout.max_new_tokens}); restart it with a "
                              "larger --max-model-len or lower rollout.max_new_tokens")
        probe = ep.check_tokenizer(tokenizer)
        k = cfg.scoring.top_k
        try:
            ep.prompt_logprobs([probe[:2]], k)
        except EngineError as e:
            raise ConfigError(f"{e}; scoring.top_k={k} needs a server started with --max-logprobs {k} (or more), "
                              "or lower scoring.top_k") from None
        return ep

    @staticmethod
    def _served_name(served: list[dict], teacher: str) -> str:
        from opdcli.errors import OpdError
        from opdcli.models import resolve_model_path

        try:
            local = resolve_model_path(teacher)
        except OpdError:  # a name only the server knows
            local = teacher
        for m in served:
            if teacher in (m.get("id"), m.get("root")) or local in (m.get("id"), m.get("root")):
                return m["id"]
        names = ", ".join(f"{m.get('id')} (from {m.get('root')})" for m in served) or "nothing"
        raise ConfigError(f"the teacher endpoint serves {names}, not model.teacher={teacher}; set model.teacher "
                          "to the served name or point vllm.teacher_url at the teacher's server")

    def check_tokenizer(self, tokenizer: Any) -> list[int]:
        """The server must split text (with the student's special tokens) into the student's ids
        (returned)."""
        specials = " ".join(t for t in (tokenizer.eos_token, tokenizer.pad_token, tokenizer.bos_token) if t)
        text = f"{PROBE} {specials}"
        mine = tokenizer(text, add_special_tokens=False)["input_ids"]
        theirs = self._call("/tokenize", {"model": self.model, "prompt": text, "add_special_tokens": False})["tokens"]
        if mine != theirs:
            at = next((i for i, (a, b) in enumerate(zip(mine, theirs, strict=False)) if a != b), min(len(mine),
                                                                                                    len(theirs)))
            raise ConfigError(f"the teacher endpoint tokenizes differently from the student (first difference at "
                              f"token {at} of {text!r}); OPD needs one vocabulary: serve a teacher with the "
                              "student's tokenizer")
        return mine

    # -- scoring ---------------------------------------------------------------------------------
    def prompt_logprobs(self, prompts: list[list[int]], k: int) -> list[Entries]:
        """For each prompt, per position: None (the first) or {id: (logprob, rank)}."""
        def one(ids: list[int]) -> Entries:
            out = self._call("/v1/completions", {"model": self.model, "prompt": ids, "max_tokens": 1,
                                                 "temperature": 1.0, "prompt_logprobs": k})
            entries = out["choices"][0]["prompt_logprobs"]
            if entries is None or len(entries) != len(ids):
                raise EngineError(f"the teacher endpoint {self.url} returned no prompt_logprobs for a "
                                  f"{len(ids)}-token prompt; is it a vLLM server?")
            return [None if d is None else {int(t): (float(v["logprob"]), v.get("rank")) for t, v in d.items()}
                    for d in entries]

        if not prompts:
            return []
        longest = max(len(p) for p in prompts)
        if self.max_model_len is not None and longest > self.max_model_len:
            raise EngineError(f"a {longest}-token prompt + response exceeds the teacher endpoint's max_model_len "
                              f"({self.max_model_len}); restart it with --max-model-len {longest} or more")
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(prompts))) as pool:
            return list(pool.map(one, prompts))


def _server_message(e: urllib.error.HTTPError) -> str:
    try:
        body = json.loads(e.read())
        return str(body.get("error", {}).get("message") or body.get("message") or body)
    except Exception:
        return e.reason or "no message"
