"""The engine interfaces: the sampler's noise stream, row shards, version stamping, weight
sync, and the checks that refuse a layout or a sampler before any model loads."""

from __future__ import annotations

import pytest
import torch

from opdcli.config import TrainRunConfig, load_config
from opdcli.dist import Dist
from opdcli.engines.hf_sampler import BlockNoise, HFSampler
from opdcli.engines.types import RowShard, SamplingParams
from opdcli.errors import ConfigError

PROMPTS = ["<|im_start|>user\nCompute 1+2.<|im_end|>\n<|im_start|>assistant\n",
           "<|im_start|>user\nCompute 13*4-7+2.<|im_end|>\n<|im_start|>assistant\n",
           "<|im_start|>user\nCompute 9-3.<|im_end|>\n<|im_start|>assistant\n"]


@pytest.fixture(scope="module")
def student(tiny_dirs):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return (AutoModelForCausalLM.from_pretrained(tiny_dirs["student"]).eval(),
            AutoTokenizer.from_pretrained(tiny_dirs["student"]))


def test_block_noise_is_the_multinomial_stream():
    probs = torch.rand(6, 11, generator=torch.Generator().manual_seed(1)).softmax(-1)
    g_ref, g_ours = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    noise = BlockNoise(g_ours, 6, 0, 11, torch.device("cpu"))
    for _ in range(3):
        ref = torch.multinomial(probs, 1, generator=g_ref).squeeze(-1)
        assert torch.equal(noise.sample(probs, torch.arange(6)), ref)
    # a process keeping rows 2..4 of the block draws the same tokens for those rows
    g_ref, g_part = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    part = BlockNoise(g_part, 6, 2, 11, torch.device("cpu"))
    whole = torch.multinomial(probs, 1, generator=g_ref).squeeze(-1)
    assert torch.equal(part.sample(probs[2:5], torch.arange(3)), whole[2:5])
    # rows that left the decode batch: the rows kept draw their own noise, not their neighbours'
    g_again = torch.Generator().manual_seed(4)
    assert torch.equal(BlockNoise(g_again, 6, 2, 11, torch.device("cpu")).sample(probs[[2, 4]], torch.tensor([0, 2])),
                       whole[[2, 4]])


def test_row_shards_sample_exactly_the_rows_of_the_whole_batch(student):
    """Two shards (run one after the other, the block widths standing in for the all-reduce)
    give the whole batch's rows, and leave the generator where the whole batch leaves it."""
    model, tok = student
    params = SamplingParams(n=2, temperature=1.0, max_new_tokens=14, batch_size=4)  # 6 rows, 2 blocks
    widths: list[int] = []

    def record(x: int) -> int:
        widths.append(x)
        return x

    g_whole = torch.Generator().manual_seed(0)
    whole = HFSampler(model, tok, generator=g_whole).sample(PROMPTS, params, shard=RowShard(0, 6, 6, record))
    assert len(widths) == 2
    for start, stop in ((0, 3), (3, 6), (4, 6), (0, 1)):  # (4, 6) sits out the first block
        it = iter(widths)
        g = torch.Generator().manual_seed(0)
        part = HFSampler(model, tok, generator=g).sample(
            PROMPTS, params, shard=RowShard(start, stop, 6, lambda x, it=it: max(x, next(it))))
        ref = whole.rows(slice(start, stop))
        assert part.prompt_len == whole.prompt_len and part.response_len == whole.response_len
        assert torch.equal(part.response_ids_B_T, ref.response_ids_B_T)
        assert torch.equal(part.response_mask_B_T, ref.response_mask_B_T)
        assert torch.allclose(part.behavior_lp_B_T, ref.behavior_lp_B_T, atol=1e-6)
        assert torch.equal(part.input_ids_B_L, ref.input_ids_B_L)
        assert part.prompt_index_B == ref.prompt_index_B
        assert torch.equal(g.get_state(), g_whole.get_state())
    # the rows really differ from each other (the test is not vacuous)
    assert not torch.equal(whole.response_ids_B_T[0], whole.response_ids_B_T[1])


def test_the_sampler_stamps_its_version_and_takes_new_weights(student):
    model, tok = student
    replica = type(model)(model.config).eval()
    sampler = HFSampler(replica, tok, generator=torch.Generator().manual_seed(0))
    sampler.sync_weights(model.state_dict(), 7)
    batch = sampler.sample(PROMPTS[:1], SamplingParams(n=3, temperature=0.0, max_new_tokens=6))
    assert batch.version_B.tolist() == [7, 7, 7]
    direct = HFSampler(model, tok).sample(PROMPTS[:1], SamplingParams(n=3, temperature=0.0, max_new_tokens=6))
    assert torch.equal(batch.response_ids_B_T, direct.response_ids_B_T)


class _NoStops:
    name, supports_stop_rules = "fake", False


def test_a_sampler_without_stop_rules_refuses_online_truncation():
    from opdcli.methods import build_method
    from opdcli.validate import check_sampler

    cfg, _ = load_config(TrainRunConfig, None, ["loss.objective=rkl"])
    online = build_method("prune", {"online": True}, cfg.loss)
    with pytest.raises(ConfigError, match="fake rollout engine cannot do; set method.options.online=false"):
        check_sampler(_NoStops, online)
    check_sampler(_NoStops, build_method("prune", {}, cfg.loss))  # offline prune needs no stops
    check_sampler(HFSampler, online)


@pytest.mark.parametrize(("overrides", "rows", "stop", "message"), [
    ([], 63, False, "do not split evenly over 2 ranks"),
    (["optim.grad_accum=40"], 64, False, r"optim.grad_accum \(40\) exceeds the 32 sequences of each rank"),
    (["dist.frozen_models=shard"], 64, True, "set dist.frozen_models=replicate"),
])
def test_data_parallel_layouts_that_cannot_run_are_refused(overrides, rows, stop, message):
    from opdcli.assembly import check_placement

    cfg, _ = load_config(TrainRunConfig, None, overrides)
    with pytest.raises(ConfigError, match=message):
        check_placement(cfg, Dist(rank=0, world=2), rows, stop)
    check_placement(cfg, Dist(), rows, stop)  # one process takes any layout


def test_rank_shards_cover_the_batch_once():
    shards = [Dist(rank=r, world=4).shard(64) for r in range(4)]
    assert shards == [(0, 16), (16, 32), (32, 48), (48, 64)]


def test_single_process_commands_refuse_torchrun(monkeypatch):
    from typer.testing import CliRunner

    from opdcli.cli import app

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    result = CliRunner().invoke(app, ["rollout", "--out", "x.jsonl"])
    assert result.exit_code == 2
    assert "opd rollout runs on one process; start it without torchrun" in result.output


def test_finished_rows_leave_the_decode_batch_without_changing_any_row(student):
    """Rows that end early leave the batch (and the KV cache); every row is still what decoding it
    alone with its own noise gives: its tokens, its behaviour log-probs and its length."""
    import copy

    from opdcli.engines.hf_sampler import sample

    model, tok = copy.deepcopy(student[0]), student[1]
    eos = tok.eos_token_id
    with torch.no_grad():  # make EOS likely, so that rows end at different steps
        model.lm_head.weight[eos] = model.lm_head.weight.mean(0) + 0.3 * model.lm_head.weight.std(0)
    texts = ["<|im_start|>user\nCompute 3+4.<|im_end|>\n", "Q: 1+2?", "abc"]
    params = SamplingParams(n=4, temperature=1.0, max_new_tokens=24, batch_size=12)
    batch = sample(model, tok, texts, params, generator=torch.Generator().manual_seed(5))
    lengths = batch.response_mask_B_T.sum(-1)
    assert len(set(lengths.tolist())) > 2, "rows should end at different steps"
    vocab = model.get_output_embeddings().weight.shape[0]
    noise = torch.empty(batch.response_len, 12, vocab).exponential_(1, generator=torch.Generator().manual_seed(5))
    P = batch.prompt_len
    for b in range(12):
        ids = batch.input_ids_B_L[b:b + 1, :P][batch.attention_mask_B_L[b:b + 1, :P] > 0][None]
        for t in range(int(lengths[b])):  # the slow reference: a full forward per token, no cache
            with torch.no_grad():
                lsm = model(input_ids=ids).logits[0, -1].float().log_softmax(-1)
            tok_t = int((lsm.exp() / noise[t, b]).argmax())
            assert tok_t == int(batch.response_ids_B_T[b, t])
            assert abs(float(lsm[tok_t]) - float(batch.behavior_lp_B_T[b, t])) < 1e-4
            ids = torch.cat([ids, torch.tensor([[tok_t]])], dim=1)
        assert bool(batch.finished_B[b]) == (int(batch.response_ids_B_T[b, int(lengths[b]) - 1]) == eos)
