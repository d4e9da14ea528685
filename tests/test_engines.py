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
        assert torch.equal(noise.sample(probs), ref)
    # a process keeping rows 2..4 of the block draws the same tokens for those rows
    g_ref, g_part = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    part = BlockNoise(g_part, 6, 2, 11, torch.device("cpu"))
    assert torch.equal(part.sample(probs[2:5]), torch.multinomial(probs, 1, generator=g_ref).squeeze(-1)[2:5])


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
