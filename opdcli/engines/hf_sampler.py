"""The transformers sampling engine (CPU or GPU): a KV-cached decode loop of our own.

Our own loop (rather than `model.generate`) records the sampler's log-prob of each token
without keeping a (B, T, V) score tensor, and hosts per-token stop rules: a `StopRule` (Prune
online truncation) is fed the teacher's logits by a follower that runs the teacher along the
sampled tokens with its own KV cache.

Randomness: a token is drawn as argmax(p / E) with E ~ Exp(1) drawn for the whole decode block
(exactly what `torch.multinomial(p, 1)` does). With a `RowShard`, a process decodes only its
rows but draws the noise of the whole block and advances its generator as far as the longest
row of the block on any process, so N processes sample exactly what one process sampling the
global batch would.

Typical use:
    sampler = HFSampler(model, tokenizer, generator=torch.Generator().manual_seed(0))
    batch = sampler.sample(texts, SamplingParams(n=4, temperature=1.0))
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from typing import Protocol

import torch

from opdcli.engines.types import GenerationControl, RolloutBatch, RowShard, SamplingParams, StopRule
from opdcli.errors import ConfigError, DataError
from opdcli.lm import output_head, unwrap, vocab_size
from opdcli.precision import autocast_region


class StopFn(Protocol):
    """Called once per decode step of a block, then `finish`ed when the block ends (a plain
    callable without `finish` works too: its rollout carries no teacher hidden states)."""

    def __call__(self, t: int, tok_B: torch.Tensor, valid_B: torch.Tensor, logits_B_V: torch.Tensor) -> torch.Tensor:
        """(step t, token sampled at t, rows for which it is a real token, the student's raw
        logits that sampled it (B x V)) -> rows to stop after this token (bool B)."""
        ...

    def finish(self, width: int) -> torch.Tensor:
        """The teacher's hidden states before the block's first `width` response tokens (B, width, H)."""
        ...


StopFactory = Callable[[torch.Tensor, torch.Tensor], StopFn]
"""(prompt ids B x P, prompt attention mask B x P) of one generation block -> its StopFn."""


def cache_kwarg(model) -> str:
    """The name under which `model.forward` takes its KV cache: `cache` (current transformers)
    or `past_key_values` (older releases, deprecated since)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def out_cache(out):
    """The KV cache a forward returned, under either name."""
    got = getattr(out, "cache", None)
    return got if got is not None else out.past_key_values


def process_logits(logits_B_V: torch.Tensor, temperature: float, top_p: float, top_k: int) -> torch.Tensor:
    """Temperature, then top-k, then top-p (nucleus) filtering; filtered entries are -inf."""
    logits_B_V = logits_B_V.float() / max(temperature, 1e-8)
    if top_k > 0 and top_k < logits_B_V.shape[-1]:
        kth = logits_B_V.topk(top_k, dim=-1).values[..., -1:]
        logits_B_V = logits_B_V.masked_fill(logits_B_V < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits_B_V.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the mass strictly before it already reaches top_p (keeps >= 1 token)
        drop_sorted = (probs.cumsum(-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits_B_V = logits_B_V.masked_fill(drop, float("-inf"))
    return logits_B_V


def eos_token_ids(tokenizer, model) -> list[int]:
    ids = {tokenizer.eos_token_id}
    gen = model.generation_config.eos_token_id if model.generation_config is not None else None
    if isinstance(gen, int):
        ids.add(gen)
    elif isinstance(gen, list):
        ids |= set(gen)
    return sorted(i for i in ids if i is not None)


def stop_token_ids(tokenizer, eos_ids: list[int], extra: tuple[str, ...]) -> list[int]:
    """The policy's EOS ids plus those of the `extra` token strings (each must be one token)."""
    out = set(eos_ids)
    for text in extra:
        tid = tokenizer.convert_tokens_to_ids(text)
        if not isinstance(tid, int) or tokenizer.convert_ids_to_tokens(tid) != text:
            raise ConfigError(f"rollout.stop_tokens: {text!r} is not a token of the student's tokenizer; "
                              "give tokens as the tokenizer spells them (e.g. <|im_end|>)")
        out.add(tid)
    return sorted(out)


class BlockNoise:
    """Exp(1) noise of one decode block of `rows` rows, of which this process keeps
    rows [offset, offset + n)."""

    def __init__(self, generator: torch.Generator | None, rows: int, offset: int, vocab: int,
                 device: torch.device) -> None:
        self.generator, self.rows, self.offset, self.vocab, self.device = generator, rows, offset, vocab, device
        self.draws = 0

    def _draw(self, dtype: torch.dtype) -> torch.Tensor:
        self.draws += 1
        q = torch.empty(self.rows, self.vocab, dtype=dtype, device=self.device)
        return q.exponential_(1, generator=self.generator)

    def sample(self, probs_A_V: torch.Tensor, rows_A: torch.Tensor) -> torch.Tensor:
        """Categorical draw per row (the same stream as torch.multinomial(probs, 1)); row a of
        `probs_A_V` is row rows_A[a] of this process's part of the block."""
        q = self._draw(probs_A_V.dtype)[self.offset + rows_A]
        return (probs_A_V / q).argmax(-1)

    def advance_to(self, draws: int, dtype: torch.dtype = torch.float32) -> None:
        """Discard draws until `draws` steps of this block have been drawn."""
        while self.draws < draws:
            self._draw(dtype)


@torch.no_grad()
def _sample_block(model, ids_B_P, am_B_P, params: SamplingParams, eos: torch.Tensor,
                  pad_id: int, noise: BlockNoise, stop: StopFactory | None):
    """Decode one block. Finished rows leave the decode batch (and the KV cache) at once; the
    outputs are pre-allocated (B, max_new_tokens) tensors filled in place and cut to the
    longest row."""
    B, P = ids_B_P.shape
    T = params.max_new_tokens
    device = ids_B_P.device
    stop_fn = stop(ids_B_P, am_B_P) if stop is not None else None
    kv, V = cache_kwarg(model), vocab_size(model)  # logits past the tokenizer's ids are padding
    keep = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    out = model(input_ids=ids_B_P, attention_mask=am_B_P,
                position_ids=(am_B_P.cumsum(-1) - 1).clamp(min=0), use_cache=True, **keep)
    past, logits_A_V = out_cache(out), out.logits[:, -1, :V]
    am_B_L = torch.cat([am_B_P, torch.zeros(B, T, dtype=am_B_P.dtype, device=device)], dim=1)
    pos_B = am_B_P.sum(-1)  # the position of each row's next token
    alive_A = torch.arange(B, device=device)  # the block's rows still decoding, in decode-batch order
    tokens_B_T = torch.full((B, T), pad_id, dtype=torch.long, device=device)
    lps_B_T = torch.zeros(B, T, device=device)
    masks_B_T = torch.zeros(B, T, dtype=torch.bool, device=device)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    width = 0
    for t in range(T):
        width = t + 1
        if params.temperature == 0:
            tok_A = logits_A_V.argmax(-1)
            lp_A = torch.zeros(tok_A.shape[0], device=device)
        else:
            lsm = process_logits(logits_A_V, params.temperature, params.top_p, params.top_k).log_softmax(-1)
            tok_A = noise.sample(lsm.exp(), alive_A)
            lp_A = lsm.gather(-1, tok_A[:, None]).squeeze(-1)
        tokens_B_T[alive_A, t] = tok_A
        lps_B_T[alive_A, t] = lp_A
        masks_B_T[alive_A, t] = True
        hit_A = torch.isin(tok_A, eos)
        finished[alive_A[hit_A]] = True
        keep_A = ~hit_A
        if stop_fn is not None:  # the rule sees the whole block (rows that left: pad, invalid)
            logits_B_V = logits_A_V.new_zeros(B, logits_A_V.shape[-1]).index_copy_(0, alive_A, logits_A_V)
            keep_A &= ~stop_fn(t, tokens_B_T[:, t], masks_B_T[:, t], logits_B_V)[alive_A]
        if not keep_A.any() or t + 1 == T:
            break
        if not keep_A.all():
            sel_A = keep_A.nonzero().squeeze(-1)
            past.batch_select_indices(sel_A)
            alive_A, tok_A = alive_A[sel_A], tok_A[sel_A]
        am_B_L[alive_A, P + t] = 1
        out = model(input_ids=tok_A[:, None], attention_mask=am_B_L[alive_A, :P + t + 1],
                    position_ids=pos_B[alive_A, None], use_cache=True, **{kv: past})
        pos_B[alive_A] += 1
        past, logits_A_V = out_cache(out), out.logits[:, -1, :V]
    finish = getattr(stop_fn, "finish", None)  # a follower; a plain stop callable keeps nothing
    hidden = finish(width) if finish is not None else None
    return tokens_B_T[:, :width], lps_B_T[:, :width], masks_B_T[:, :width], finished, hidden


def check_context(model, prompt_texts: list[str], max_new_tokens: int, lengths_P: list[int] | None = None) -> None:
    """Refuse, before any forward, a prompt whose tokens plus max_new_tokens exceed the model's
    context (config.max_position_embeddings). Without `lengths_P` (token counts) only texts too
    long to fit at any tokenisation (over 64 characters per position) are caught, so that a
    huge prompt is refused before it is tokenised."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if not isinstance(limit, int) or limit <= 0:
        return
    for i, text in enumerate(prompt_texts):
        n = len(text) // 64 if lengths_P is None else lengths_P[i]
        if n + max_new_tokens > limit:
            raise DataError(f"prompt {i} has {'over ' if lengths_P is None else ''}{n} tokens; with "
                            f"rollout.max_new_tokens={max_new_tokens} that exceeds the model's context of {limit} "
                            "positions (max_position_embeddings); shorten or filter the prompts, or lower "
                            "rollout.max_new_tokens")


def sample(model, tokenizer, prompt_texts: list[str], params: SamplingParams, *,
           generator: torch.Generator | None = None, stop: StopFactory | None = None,
           shard: RowShard | None = None, on_block: Callable[[int, int], None] | None = None) -> RolloutBatch:
    """Sample `params.n` responses per prompt text (already chat-rendered).

    With `shard`, `prompt_texts` are the whole batch's prompts and only rows
    [shard.start, shard.stop) of the n-fold expanded batch are decoded here. `on_block(rows,
    tokens)` is called after each decode block (a progress bar).
    """
    device = next(model.parameters()).device
    check_context(model, prompt_texts, params.max_new_tokens)
    enc = tokenizer(prompt_texts, return_tensors="pt", padding=True, add_special_tokens=False,
                    padding_side="left")
    check_context(model, prompt_texts, params.max_new_tokens, enc["attention_mask"].sum(-1).tolist())
    ids_P_L = enc["input_ids"].to(device)
    am_P_L = enc["attention_mask"].to(device)
    index_all = [p for p in range(len(prompt_texts)) for _ in range(params.n)]
    shard = shard if shard is not None else RowShard.whole(len(index_all))
    assert shard.total == len(index_all), f"shard of {shard.total} rows for a batch of {len(index_all)}"
    reduce_max = shard.reduce_max if shard.reduce_max is not None else (lambda x: x)
    index_B = index_all[shard.start:shard.stop]
    ids_B_P, am_B_P = ids_P_L[index_B], am_P_L[index_B]
    eos = torch.tensor(stop_token_ids(tokenizer, eos_token_ids(tokenizer, model), params.stop_tokens), device=device)
    pad_id = tokenizer.pad_token_id
    vocab = vocab_size(model)
    was_training = model.training
    model.eval()
    blocks, widths = [], []
    with autocast_region(model):  # a mixed-precision student: weights cast once per call, not per token
        for a in range(0, shard.total, params.batch_size):
            b_end = min(a + params.batch_size, shard.total)
            lo, hi = max(a, shard.start), min(b_end, shard.stop)
            noise = BlockNoise(generator, b_end - a, lo - a, vocab, device)
            steps = 0
            if lo < hi:
                rows = slice(lo - shard.start, hi - shard.start)
                blk = _sample_block(model, ids_B_P[rows], am_B_P[rows], params, eos, pad_id, noise, stop)
                blocks.append(blk)
                steps = blk[0].shape[1]
                if on_block is not None:
                    on_block(hi - lo, int(blk[2].sum()))
            width = reduce_max(steps)  # the longest row of this block on any process
            if params.temperature != 0:
                noise.advance_to(width)
            widths.append(width)
    model.train(was_training)
    T = max(widths, default=0)

    def cat(i: int, fill, dtype) -> torch.Tensor:
        if not blocks:
            return torch.full((0, T), fill, dtype=dtype, device=device)
        return torch.cat([torch.nn.functional.pad(blk[i], (0, T - blk[i].shape[1]), value=fill)
                          for blk in blocks])

    resp_B_T, lp_B_T = cat(0, pad_id, torch.long), cat(1, 0.0, torch.float32)
    mask_B_T = cat(2, False, torch.bool).long()
    finished_B = torch.cat([blk[3] for blk in blocks]) if blocks else torch.zeros(0, dtype=torch.bool)
    hidden_B_T_H = None
    if blocks and all(blk[4] is not None for blk in blocks):
        hidden_B_T_H = torch.cat([torch.nn.functional.pad(blk[4], (0, 0, 0, T - blk[4].shape[1]))
                                  for blk in blocks])
    return RolloutBatch(
        input_ids_B_L=torch.cat([ids_B_P, resp_B_T], dim=1),
        attention_mask_B_L=torch.cat([am_B_P, mask_B_T.to(am_B_P.dtype)], dim=1),
        prompt_len=ids_B_P.shape[1],
        response_ids_B_T=resp_B_T,
        response_mask_B_T=mask_B_T,
        behavior_lp_B_T=lp_B_T,
        finished_B=finished_B,
        prompt_index_B=tuple(index_B),
        prompt_texts_P=tuple(prompt_texts),
        version_B=torch.zeros(len(index_B), dtype=torch.long),
        teacher_hidden_B_T_H=hidden_B_T_H,
    )


class _Follower:
    """Runs the teacher along one block's sampled tokens in chunks and feeds a StopRule (see
    StopFn). It keeps the teacher's final hidden state before every response token, so the
    scorer applies only the teacher's head to them instead of running its body again
    (`RolloutBatch.teacher_hidden_B_T_H`). Rows that have ended leave its KV cache."""

    def __init__(self, teacher, rule: StopRule, ids_B_P: torch.Tensor, am_B_P: torch.Tensor) -> None:
        lm = unwrap(teacher)
        self.body, self.head = lm.base_model, output_head(lm)
        self.rule, self.chunk = rule, max(1, rule.chunk)
        B = ids_B_P.shape[0]
        with torch.no_grad():
            out = self.body(input_ids=ids_B_P, attention_mask=am_B_P,
                            position_ids=(am_B_P.cumsum(-1) - 1).clamp(min=0), use_cache=True)
        self.kv = cache_kwarg(self.body)
        self.past, self.next_h_A_H = out_cache(out), out.last_hidden_state[:, -1]
        self.am_A = am_B_P
        self.live_A = torch.arange(B, device=ids_B_P.device)  # block rows still in the cache
        self.state = rule.open(B, ids_B_P.device)
        self.tokens: list[torch.Tensor] = []
        self.valid: list[torch.Tensor] = []
        self.student_topk: list[torch.Tensor] = []
        self.hidden: list[torch.Tensor] = []  # (B, C, H) per flushed chunk
        self.rows = B
        self.scored_tokens = 0

    def __call__(self, t: int, tok_B: torch.Tensor, valid_B: torch.Tensor, logits_B_V: torch.Tensor) -> torch.Tensor:
        self.tokens.append(tok_B)
        self.valid.append(valid_B)
        if self.rule.student_topk > 0:
            self.student_topk.append(logits_B_V.topk(self.rule.student_topk, dim=-1).indices)
        if len(self.tokens) < self.chunk:
            return torch.zeros_like(valid_B)
        return self.flush()

    @torch.no_grad()
    def flush(self) -> torch.Tensor:
        """Score the pending chunk with the teacher; return the rows (of the block) to stop now."""
        tok_B_C = torch.stack(self.tokens, 1)
        valid_B_C = torch.stack(self.valid, 1)
        s_ids_B_C_K = torch.stack(self.student_topk, 1) if self.student_topk else None
        self.tokens, self.valid, self.student_topk = [], [], []
        B, C = tok_B_C.shape
        live = self.live_A
        if not live.numel():  # every row has left: nothing to score or stop
            self.hidden.append(self.next_h_A_H.new_zeros(B, C, self.next_h_A_H.shape[-1]))
            return torch.zeros_like(valid_B_C[:, 0])
        self.am_A = torch.cat([self.am_A, valid_B_C[live].to(self.am_A.dtype)], dim=1)
        pos = (self.am_A.cumsum(-1) - 1).clamp(min=0)[:, -C:]
        out = self.body(input_ids=tok_B_C[live], attention_mask=self.am_A, position_ids=pos,
                        use_cache=True, **{self.kv: self.past})
        # the hidden state that predicts token j is the one before it
        h_A_C_H = torch.cat([self.next_h_A_H[:, None], out.last_hidden_state[:, :-1]], dim=1)
        h_B_C_H = h_A_C_H.new_zeros(B, C, h_A_C_H.shape[-1]).index_copy_(0, live, h_A_C_H)
        self.hidden.append(h_B_C_H)
        z_A_C_V = self.head(h_A_C_H).float()
        logits_B_C_V = z_A_C_V.new_zeros(B, C, z_A_C_V.shape[-1]).index_copy_(0, live, z_A_C_V)
        self.scored_tokens += int(valid_B_C.sum())
        stop_B = self.state.update(tok_B_C, s_ids_B_C_K, logits_B_C_V, valid_B_C)
        # a row whose chunk ends invalid (EOS, budget) or that stops now leaves the cache
        keep_A = valid_B_C[live, -1] & ~stop_B[live]
        self.past, self.next_h_A_H = out_cache(out), out.last_hidden_state[keep_A.nonzero().squeeze(-1), -1]
        if not keep_A.all():
            sel_A = keep_A.nonzero().squeeze(-1)
            if sel_A.numel():
                self.past.batch_select_indices(sel_A)
            self.live_A, self.am_A = live[sel_A], self.am_A[sel_A]
        return stop_B

    def finish(self, width: int) -> torch.Tensor:
        """Score what is still pending (no stop decision left to make); the teacher hidden
        states before each of the block's first `width` response tokens, (B, width, H)."""
        if self.tokens:
            self.flush()
        if not self.hidden:
            return self.next_h_A_H.new_zeros(self.rows, 0, self.next_h_A_H.shape[-1])
        return torch.cat(self.hidden, 1)[:, :width]


class HFSampler:
    """Sampler on a transformers model (the learner's own module, or a replica kept in sync).

    Args:
        model: the policy (a transformers causal LM, never a sharded one).
        tokenizer: its tokenizer.
        generator: the sampling generator (on the model's device).
        follower: the teacher that follows generation for stop rules (None: no stop rules).
    """

    name = "hf"
    supports_stop_rules = True

    def __init__(self, model, tokenizer, *, generator: torch.Generator | None = None, follower=None) -> None:
        self.model, self.tokenizer, self.generator, self.follower = model, tokenizer, generator, follower
        self.version = 0

    def sync_weights(self, state: dict[str, torch.Tensor] | None, version: int) -> None:
        if state is not None:
            self.model.load_state_dict(state)
        self.version = version

    def sample(self, prompt_texts_P: list[str], params: SamplingParams, *,
               control: GenerationControl | None = None, shard: RowShard | None = None,
               on_block: Callable[[int, int], None] | None = None) -> RolloutBatch:
        if control is not None:
            params = SamplingParams(n=params.n, temperature=params.temperature, top_p=params.top_p,
                                    top_k=params.top_k, max_new_tokens=control.max_new_tokens,
                                    batch_size=params.batch_size, stop_tokens=params.stop_tokens)
        rule = control.stop if control is not None else None
        followers: list[_Follower] = []
        factory = None
        if rule is not None:
            assert self.follower is not None, "a stop rule needs the sampler's follower (the teacher)"

            def factory(ids_B_P: torch.Tensor, am_B_P: torch.Tensor) -> _Follower:
                followers.append(_Follower(self.follower, rule, ids_B_P, am_B_P))
                return followers[-1]

        batch = sample(self.model, self.tokenizer, prompt_texts_P, params, generator=self.generator,
                       stop=factory, shard=shard, on_block=on_block)
        stopped = torch.cat([f.state.stopped_B for f in followers]) if followers else None
        return dataclasses.replace(batch, version_B=torch.full_like(batch.version_B, self.version), stopped_B=stopped,
                                   follower_tokens=sum(f.scored_tokens for f in followers))


def decode_responses(tokenizer, batch: RolloutBatch) -> list[str]:
    """Response texts without padding and without the EOS token."""
    texts = []
    for ids_T, m_T in zip(batch.response_ids_B_T.tolist(), batch.response_mask_B_T.tolist(), strict=True):
        texts.append(tokenizer.decode([i for i, m in zip(ids_T, m_T, strict=True) if m],
                                      skip_special_tokens=True))
    return texts
