"""`vllm.weight_sync=nccl`: the learner broadcasts new weights over NCCL, GPU to GPU, to the vLLM
engines of the Ray rollout workers (train.mode=async), through vLLM's weight-transfer API.

One NCCL group: the learner is rank 0 (it hosts the rendezvous), worker i is rank i + 1, each on
its own GPU (NCCL refuses two ranks on one device: `check_devices` says which). Per push the
learner snapshots the unique tensors (tied weights once) on its GPU, tells every worker what
comes (names, dtypes, shapes, in order: `weight_meta`), and broadcasts them one by one on a
stream of its own, in a background thread, so that training goes on. A worker receives
after the batch it is sampling (Ray runs an actor's calls in order), loads the tensors through
the model's own `load_weights` (HF names; vLLM stacks q/k/v itself), resets its prefix cache and
stamps the version; its next batch is sampled with them. A replaced worker makes the learner
rebuild the group on a new port and send the last snapshot again.
"""

from __future__ import annotations

import socket
import threading
from typing import Any

import torch


def unique_tensors(state: dict[str, torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
    """(name, contiguous tensor) once per storage: tied weights (embeddings = lm_head) go once,
    under their first name; the engine re-ties them."""
    seen, out = set(), []
    for k, v in state.items():
        if v.data_ptr() not in seen:
            seen.add(v.data_ptr())
            out.append((k, v.detach().contiguous()))
    return out


def weight_meta(pairs: list[tuple[str, torch.Tensor]]) -> dict[str, list]:
    """vLLM's NCCL update_info for `pairs`, in broadcast order."""
    return {"names": [k for k, _ in pairs], "dtype_names": [str(v.dtype).removeprefix("torch.") for _, v in pairs],
            "shapes": [list(v.shape) for _, v in pairs]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def check_devices(learner_uuid: str, worker_uuids: list[str]) -> None:
    """Refuse a group in which two ranks share a GPU (NCCL cannot run it)."""
    from opdcli.errors import ConfigError

    seen = {learner_uuid: "the learner"}
    for i, u in enumerate(worker_uuids):
        if u in seen:
            raise ConfigError(f"rollout worker {i} runs on the same GPU as {seen[u]}, which vllm.weight_sync=nccl "
                              "cannot do; give every worker its own GPU (asynchronous.worker_gpus=1, and start Ray "
                              "without the learner's GPU) or set vllm.weight_sync=inprocess")
        seen[u] = f"rollout worker {i}"


def device_uuid() -> str:
    return str(torch.cuda.get_device_properties(torch.cuda.current_device()).uuid)


class WeightGroup:
    """The learner's side (rank 0) of the group with the pool's `workers` (Ray actor handles of
    RolloutWorker)."""

    def __init__(self, ray: Any, workers: list[Any], connect: Any = None) -> None:
        """`connect`: the rendezvous (vLLM's nccl_common.trainer_init; tests pass their own)."""
        if connect is None:
            from vllm.distributed.weight_transfer.nccl_common import trainer_init as connect
        self.ray, self.connect, self.comm, self.snapshot = ray, connect, None, None
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None
        self.join(workers)

    def join(self, workers: list[Any]) -> None:
        """Form the group (every worker joins while the learner waits at the rendezvous)."""
        check_devices(device_uuid(), self.ray.get([w.device_uuid.remote() for w in workers]))
        self.workers = list(workers)
        address, port, world = self.ray.util.get_node_ip_address(), free_port(), len(workers) + 1
        joined = [w.join_weight_group.remote(address, port, world, i + 1) for i, w in enumerate(workers)]
        self.comm = self.connect({"master_address": address, "master_port": port, "world_size": world}, rank=0)
        self.ray.get(joined)

    def push(self, state: dict[str, torch.Tensor], version: int) -> None:
        """Snapshot `state` and broadcast it to every worker in the background."""
        self.wait()
        pairs = [(k, v.clone()) for k, v in unique_tensors(state)]  # the learner goes on changing its own
        self.snapshot = (pairs, weight_meta(pairs), version)
        self._send()

    def _send(self) -> None:
        pairs, meta, version = self.snapshot
        received = [w.receive_weights.remote(meta, version) for w in self.workers]
        stream, ready = torch.cuda.Stream(), torch.cuda.current_stream()

        def run() -> None:
            try:
                stream.wait_stream(ready)  # the snapshot's copies first
                for _, tensor in pairs:
                    self.comm.broadcast(tensor, src=0, stream=stream)
                stream.synchronize()
                self.ray.get(received)
            except BaseException as e:  # noqa: BLE001 - re-raised by wait() in the training thread
                self.error = e

        self.thread = threading.Thread(target=run, name="opd-nccl-weights", daemon=True)
        self.thread.start()

    def wait(self) -> None:
        """Until the last broadcast is done; its failure is raised here."""
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        if self.error is not None:
            from opdcli.errors import EngineError

            error, self.error = self.error, None
            raise EngineError(f"broadcasting weights to the rollout workers over NCCL failed: {error}") from None

    def rebuild(self, workers: list[Any], alive: list[bool]) -> None:
        """After a worker was replaced: a new group over `workers` (the survivors leave the old
        one first), then the last snapshot again."""
        self.wait()
        self.ray.get([w.leave_weight_group.remote() for w, ok in zip(workers, alive, strict=True) if ok])
        self.close()
        self.join(workers)
        if self.snapshot is not None:
            self._send()

    def close(self) -> None:
        if self.comm is not None:
            self.comm.destroy()
            self.comm = None
