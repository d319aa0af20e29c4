"""BatchNorm running statistics averaged over gloo ranks (the CPU side of distillery.platform.engine.norm_sync):
two processes whose BatchNorm layers saw different batches end with the same, averaged statistics."""

from __future__ import annotations

import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from distillery.platform.engine.norm_sync import average_norm_statistics


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2),
                         nn.BatchNorm1d(2))


def trained_on(rank: int, steps: int) -> nn.Module:
    """``small_net`` after ``steps`` training-mode forwards on batches that depend on ``rank``."""
    net = small_net().train()
    generator = torch.Generator().manual_seed(100 + rank)
    with torch.no_grad():
        for _ in range(steps):
            net(torch.randn(4, 3, 6, 6, generator=generator) * (1 + rank) + rank)
    return net


def _worker(rank: int, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        net, other = trained_on(rank, steps=2 + rank), trained_on(rank + 10, steps=1)
        average_norm_statistics(net, other)
        torch.save({"net": net.state_dict(), "other": other.state_dict()}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_running_statistics_are_averaged_over_ranks(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(port, str(tmp_path)), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]

    for name, ranks in (("net", (0, 1)), ("other", (10, 11))):
        steps = (2, 3) if name == "net" else (1, 1)
        local = [trained_on(r, s).state_dict() for r, s in zip(ranks, steps)]
        assert not torch.equal(local[0]["1.running_mean"], local[1]["1.running_mean"])  # they did differ
        mine, theirs = results[0][name], results[1][name]
        for key in mine:
            assert torch.equal(mine[key], theirs[key]), (name, key)  # every rank holds the same state
            if key.endswith(("running_mean", "running_var")):
                expected = (local[0][key].double() + local[1][key].double()) / 2
                assert torch.allclose(mine[key].double(), expected, atol=1e-6), (name, key)
            elif key.endswith("num_batches_tracked"):
                assert int(mine[key]) == (sum(steps) // 2), (name, key)  # the integer mean
            else:  # parameters are left alone (DeepSpeed keeps those in sync)
                assert torch.equal(mine[key], local[0][key]), (name, key)
