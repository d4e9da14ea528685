"""vllm.weight_sync=nccl on fakes (no GPU, no vLLM, no Ray): what the learner tells the workers
and broadcasts, in which order, from a snapshot the learner's later steps cannot touch; the group
rebuilt after a worker is replaced; the engine side's calls; the refusals. The broadcast itself
needs CUDA GPUs and stays unchecked here."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from opdcli.config import TrainRunConfig, load_config
from opdcli.engines import nccl_weights
from opdcli.engines.nccl_weights import WeightGroup, check_devices, unique_tensors, weight_meta
from opdcli.errors import ConfigError, EngineError


def _state():
    emb = torch.arange(12.0).reshape(4, 3)
    return {"model.embed_tokens.weight": emb, "model.norm.weight": torch.ones(3),
            "lm_head.weight": emb, "model.layers.0.mlp.up_proj.weight": torch.arange(6.0).reshape(3, 2).t()}


def test_tied_weights_go_once_and_the_meta_follows_the_broadcast_order():
    pairs = unique_tensors(_state())
    assert [k for k, _ in pairs] == ["model.embed_tokens.weight", "model.norm.weight",
                                     "model.layers.0.mlp.up_proj.weight"]
    assert all(v.is_contiguous() for _, v in pairs)
    assert weight_meta(pairs) == {"names": [k for k, _ in pairs], "dtype_names": ["float32"] * 3,
                                  "shapes": [[4, 3], [3], [2, 3]]}


def test_two_ranks_on_one_gpu_are_refused():
    check_devices("gpu-a", ["gpu-b", "gpu-c"])
    with pytest.raises(ConfigError, match="worker 1 runs on the same GPU as the learner"):
        check_devices("gpu-a", ["gpu-b", "gpu-a"])
    with pytest.raises(ConfigError, match="worker 1 runs on the same GPU as rollout worker 0"):
        check_devices("gpu-a", ["gpu-b", "gpu-b"])


class _Call:
    def __init__(self, log, name, fn):
        self.log, self.name, self.fn = log, name, fn

    def remote(self, *args):
        self.log.append((self.name, args))
        return self.fn(*args)


class FakeWorker:
    def __init__(self, i, log, uuid):
        self.i, self.received = i, []
        self.device_uuid = _Call(log, f"uuid{i}", lambda: uuid)
        self.join_weight_group = _Call(log, f"join{i}", lambda *a: None)
        self.receive_weights = _Call(log, f"receive{i}", lambda meta, v: self.received.append((meta, v)))
        self.leave_weight_group = _Call(log, f"leave{i}", lambda: None)


class FakeComm:
    def __init__(self, fail=False):
        self.sent, self.destroyed, self.fail = [], False, fail

    def broadcast(self, tensor, src, stream):
        if self.fail:
            raise RuntimeError("NCCL error: unhandled system error")
        assert src == 0
        self.sent.append(tensor.clone())

    def destroy(self):
        self.destroyed = True


@pytest.fixture
def group(monkeypatch):
    monkeypatch.setattr(nccl_weights, "device_uuid", lambda: "learner-gpu")
    ports = iter(range(29500, 29600))
    monkeypatch.setattr(nccl_weights, "free_port", lambda: next(ports))
    monkeypatch.setattr(torch.cuda, "Stream", lambda: SimpleNamespace(wait_stream=lambda s: None,
                                                                       synchronize=lambda: None))
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: None)
    log, joins, comms = [], [], []
    ray = SimpleNamespace(get=lambda x: x, util=SimpleNamespace(get_node_ip_address=lambda: "10.0.0.1"))

    def connect(info, rank):
        joins.append((info, rank))
        comms.append(FakeComm())
        return comms[-1]

    workers = [FakeWorker(i, log, f"gpu-{i}") for i in range(2)]
    return WeightGroup(ray, workers, connect=connect), workers, log, joins, comms


def test_a_push_tells_every_worker_then_broadcasts_a_snapshot(group):
    g, workers, log, joins, comms = group
    (info, rank), = joins
    assert rank == 0 and info["world_size"] == 3 and info["master_address"] == "10.0.0.1"
    assert [n for n, _ in log if n.startswith("join")] == ["join0", "join1"]
    assert [a[3] for n, a in log if n.startswith("join")] == [1, 2]  # worker i is rank i + 1
    assert all(a[1] == info["master_port"] for n, a in log if n.startswith("join"))
    state = _state()
    g.push(state, 7)
    state["model.norm.weight"].add_(5.0)  # the learner's next step, while the broadcast may still run
    g.wait()
    for w in workers:
        (meta, version), = w.received
        assert version == 7 and meta["names"][0] == "model.embed_tokens.weight" and len(meta["names"]) == 3
    sent = comms[0].sent
    assert [tuple(t.shape) for t in sent] == [(4, 3), (3,), (2, 3)]
    assert torch.equal(sent[1], torch.ones(3))  # the snapshot, not the tensor changed after push
    assert torch.equal(sent[2], torch.arange(6.0).reshape(3, 2).t())


def test_a_replaced_worker_rebuilds_the_group_and_gets_the_last_weights(group):
    g, workers, log, joins, comms = group
    g.push(_state(), 3)
    g.wait()
    fresh = FakeWorker(1, log, "gpu-9")
    g.rebuild([workers[0], fresh], alive=[True, False])
    g.wait()
    assert ("leave0", ()) in log and not any(n == "leave1" for n, _ in log)
    assert comms[0].destroyed and len(joins) == 2
    assert (joins[0][0]["master_port"], joins[1][0]["master_port"]) == (29500, 29501)  # a new rendezvous
    assert [a[1] for n, a in log if n.startswith("join")][-2:] == [29501, 29501]  # both members join it
    assert fresh.received[0][1] == 3 and workers[0].received[-1][1] == 3
    assert len(comms[1].sent) == 3


def test_a_failed_broadcast_is_raised_in_the_training_thread(group):
    g, workers, log, joins, comms = group
    comms[0].fail = True
    g.push(_state(), 1)
    with pytest.raises(EngineError, match="over NCCL failed: NCCL error"):
        g.wait()


def test_the_engine_side_starts_receives_finishes_and_resets():
    from opdcli.config import VLLMConfig
    from opdcli.engines.vllm_engine import VLLMSampler

    calls = []

    class LLM:
        def __getattr__(self, name):
            return lambda *a, **kw: calls.append((name, a))

    s = VLLMSampler.__new__(VLLMSampler)
    s.llm, s.vcfg, s.asleep, s.weight_pushes, s.version = LLM(), VLLMConfig(weight_sync="nccl"), False, 0, 0
    s.join_weight_group("10.0.0.1", 1234, 3, 2)
    assert calls[0][0] == "init_weight_transfer_engine"
    assert calls[0][1][0]["init_info"] == {"master_address": "10.0.0.1", "master_port": 1234, "world_size": 3,
                                           "rank_offset": 2, "packed": False}
    meta = weight_meta(unique_tensors(_state()))
    s.receive_weights(meta, 5)
    assert [c[0] for c in calls[1:]] == ["start_weight_update", "update_weights", "finish_weight_update",
                                         "reset_prefix_cache"]
    assert calls[2][1][0] == {"update_info": meta} and s.version == 5 and s.weight_pushes == 1


@pytest.mark.parametrize(("sets", "match"), [
    (["vllm.weight_sync=nccl", "rollout.engine=vllm"], "set train.mode=async and rollout.engine=vllm"),
    (["vllm.weight_sync=nccl", "rollout.engine=vllm", "train.mode=async"], "asynchronous.worker_gpus=1"),
])
def test_nccl_config_refusals(sets, match):
    from opdcli.validate import validate_train_config

    cfg, explicit = load_config(TrainRunConfig, None, sets)
    with pytest.raises(ConfigError, match=match):
        validate_train_config(cfg, explicit)


def test_nccl_on_cpu_is_refused_before_vllm_is_needed():
    from opdcli.assembly import check_engine

    cfg, _ = load_config(TrainRunConfig, None, ["vllm.weight_sync=nccl", "rollout.engine=vllm", "train.mode=async",
                                                "asynchronous.worker_gpus=1", "run.device=cpu"])
    with pytest.raises(ConfigError, match="run.device is cpu"):
        check_engine(cfg, cfg.model.student, "student")
