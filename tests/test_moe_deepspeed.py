"""Dynamic-DINO experts on DeepSpeed's MoE layer: gates, step-0 equivalence, 2-rank expert parallelism."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

os.environ.setdefault("DS_ACCELERATOR", "cpu")

from deepspeed.moe.sharded_moe import TopKGate  # noqa: E402

from distillery.platform.moe.expert_parallel import (  # noqa: E402
    DeepSpeedMoEFFN,
    DynamicDinoGate,
    deepspeed_gate_is_exact,
    gather_moe_ffn,
    to_deepspeed_moe,
)
from distillery.students.moe import split_ffn_into_experts  # noqa: E402

D, H = 16, 48


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dense_ffn(d: int = D, h: int = H) -> nn.Module:
    return nn.Sequential(nn.Linear(d, h), nn.GELU(), nn.Linear(h, d)).eval()


@pytest.fixture(scope="module")
def single_rank():
    """A world-size-1 gloo process group on 127.0.0.1 for DeepSpeed's MoE layer."""
    from distillery.platform.engine.worker import init_deepspeed_comm

    created = not dist.is_initialized()
    if created:
        saved = {k: os.environ.get(k) for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1",
                          LOCAL_RANK="0")
        init_deepspeed_comm(False, auto_mpi_discovery=False)
    yield
    if created:
        dist.destroy_process_group()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# ---------------------------------------------------------------------------- gates
@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_deepspeed_gate_and_ours_route_to_the_same_experts(single_rank, k):
    """DeepSpeed 0.19.8 serves k=1 (top1gating), k=2 (top2gating) and k>2 (topkgating)."""
    torch.manual_seed(k)
    moe = split_ffn_into_experts(dense_ffn(), 3, k)
    with torch.no_grad():   # a trained-looking router: no ties anywhere
        moe.router.piece_weight.normal_(0, 0.3)
    x = torch.randn(40, D)

    ds_gate = TopKGate(D, moe.num_experts, k=k, capacity_factor=1.0, eval_capacity_factor=1.0, min_capacity=0,
                       noisy_gate_policy=None, drop_tokens=False, use_rts=False, top2_2nd_expert_sampling=False)
    with torch.no_grad():
        ds_gate.wg.weight.copy_(moe.router.weight)
    _, _, _, ds_indices, _, ds_gates, _ = ds_gate(x, None, True)
    ours = moe.route(x)
    assert torch.equal(torch.sort(ds_indices.t().long(), dim=1).values,
                       torch.sort(ours.expert_index, dim=1).values)
    # Same experts, but DeepSpeed's weights sum to 1 (k >= 2) or to p (k = 1); ours sum to k.
    assert torch.allclose(ours.combine_weight.sum(1), torch.full((40,), float(k)), atol=1e-5)
    if k >= 2:
        assert torch.allclose(ds_gates.sum(0), torch.ones(40), atol=1e-5)
    else:
        assert (ds_gates.sum(0) < 1).all()

    # Our gate plugged into DeepSpeed's interface gives exactly the plain routing.
    plugged = DynamicDinoGate(moe.router, k)
    l_aux, capacity, E, indices, locations, gates, counts = plugged(x, None, True)
    assert E == moe.num_experts
    assert torch.equal(indices.t().long(), ours.expert_index)
    assert torch.equal(gates.t(), ours.combine_weight)
    assert torch.equal(locations.t().long(), ours.location)
    assert l_aux == ours.balance_loss
    assert int(capacity) == int(torch.bincount(ours.expert_index.reshape(-1)).max())
    assert torch.equal(counts, torch.bincount(ours.expert_index.reshape(-1), minlength=E))


def test_our_gate_dense_form_matches_sparse_routes(single_rank):
    torch.manual_seed(11)
    moe = split_ffn_into_experts(dense_ffn(), 2, 2, capacity_factor=0.75)
    with torch.no_grad():
        moe.router.piece_weight.normal_(0, 0.3)
    gate = DynamicDinoGate(moe.router, 2, capacity_factor=0.75, eval_capacity_factor=0.75)
    x = torch.randn(12, D)
    l1, C, E, indices, locations, gates, _ = gate(x, None, True)
    l2, combine, dispatch, _ = gate(x, None, False)
    assert l1 == l2 and combine.shape == (12, E, int(C))
    expected = torch.zeros(12, E, int(C))
    for r in range(2):
        for s in range(12):
            if indices[r, s] >= 0:
                expected[s, indices[r, s], locations[r, s]] += gates[r, s]
    assert torch.equal(combine, expected) and torch.equal(dispatch, expected.bool())
    assert (indices < 0).any(), "capacity 0.75 should drop some routes here"


def test_deepspeed_gate_is_only_exact_for_a_single_expert():
    assert deepspeed_gate_is_exact(1, 1)
    assert not deepspeed_gate_is_exact(4, 1) and not deepspeed_gate_is_exact(1, 2)


# ---------------------------------------------------------------------------- step-0 equivalence
@pytest.mark.parametrize("copies,k", [(1, 1), (4, 1), (2, 2), (4, 2), (16, 2), (3, 4)])
def test_deepspeed_moe_from_split_ffn_equals_dense_at_step0(single_rank, copies, k):
    torch.manual_seed(copies * 7 + k)
    ffn = dense_ffn()
    moe = split_ffn_into_experts(ffn, copies, k).eval()
    layer = to_deepspeed_moe(moe, ep_size=1).eval()
    assert isinstance(layer, DeepSpeedMoEFFN)
    assert isinstance(layer.gate, DynamicDinoGate) != deepspeed_gate_is_exact(copies, k)
    assert len(layer.local_experts) == copies * k
    x = torch.randn(2, 9, D) * 2
    with torch.no_grad():
        y = layer(x)
        assert y.shape == x.shape
        assert (y - ffn(x)).abs().max().item() < 1e-5
        assert (y - moe(x)).abs().max().item() < 1e-5
    assert layer.aux_loss.item() == pytest.approx(0.01 * layer.load_balancing_loss.item())
    assert int(layer.exp_counts.sum()) == 18 * k


@pytest.mark.parametrize("copies,k", [(4, 1), (2, 2), (3, 4)])
def test_deepspeed_own_gate_misses_the_dense_output(single_rank, copies, k):
    """Why we plug our gate: DeepSpeed's normalisation gives FFN/k (k >= 2) or p * FFN (k = 1)."""
    torch.manual_seed(copies + k)
    ffn = dense_ffn()
    moe = split_ffn_into_experts(ffn, copies, k).eval()
    layer = to_deepspeed_moe(moe, use_our_gate=False).eval()
    assert isinstance(layer.gate, TopKGate)
    x = torch.randn(20, D)
    with torch.no_grad():
        y, dense = layer(x), ffn(x)
    assert (y - dense).abs().max().item() > 1e-2
    if k >= 2:
        assert (y * k - dense).abs().max().item() < 1e-5


def test_capacity_dropping_agrees_with_plain_moe(single_rank):
    torch.manual_seed(12)
    moe = split_ffn_into_experts(dense_ffn(), 4, 2, capacity_factor=1.0).eval()
    with torch.no_grad():
        moe.router.piece_weight.normal_(0, 1.0)
    layer = to_deepspeed_moe(moe).eval()
    x = torch.randn(30, D)
    with torch.no_grad():
        assert (layer(x) - moe(x)).abs().max().item() < 1e-5
    assert not moe.route(x).kept.all(), "the test should exercise dropping"


def test_gather_moe_ffn_round_trip_single_rank(single_rank):
    torch.manual_seed(13)
    moe = split_ffn_into_experts(dense_ffn(), 2, 2).eval()
    x = torch.randn(7, D)
    layer = to_deepspeed_moe(moe, use_our_gate=True).eval()
    with torch.no_grad():
        layer.gate.router.piece_weight.normal_(0, 0.3)   # make the round trip non-trivial
        layer.local_experts[1].linear1.weight.mul_(2.0)
        back = gather_moe_ffn(layer).eval()
        assert (back(x) - layer(x)).abs().max().item() < 1e-6
    # From DeepSpeed's own gate: same router logits and experts; the plain module then applies
    # Dynamic-DINO's normalisation (documented), so only the parts are compared.
    layer = to_deepspeed_moe(moe, use_our_gate=False).eval()
    back = gather_moe_ffn(layer)
    with torch.no_grad():
        assert torch.equal(back.router(x), nn.functional.linear(x, layer.gate.wg.weight))
        assert torch.equal(back.w2[3], layer.local_experts[3].linear2.weight)


def test_converter_errors(single_rank):
    moe = split_ffn_into_experts(dense_ffn(), 3, 2)
    with pytest.raises(ValueError, match="ep_size=4 must divide the number of experts 6"):
        to_deepspeed_moe(moe, ep_size=4)
    with pytest.raises(TypeError, match="expects an MoEFFN"):
        to_deepspeed_moe(dense_ffn())


# ---------------------------------------------------------------------------- 2 ranks, ep_size=2
class Net(nn.Module):
    def __init__(self, ffn: nn.Module):
        super().__init__()
        self.inp = nn.Linear(D, D)
        self.ffn = ffn
        self.head = nn.Linear(D, 1)

    def forward(self, x):
        h = self.inp(x)
        return self.head(h + self.ffn(h)).squeeze(-1)


def _engine(seed: int):
    import deepspeed
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    torch.manual_seed(seed)   # same on both ranks: same dense model, same non-expert init
    ffn = dense_ffn()
    layer = to_deepspeed_moe(split_ffn_into_experts(ffn, 2, 2), ep_size=2)
    net = Net(layer)
    groups = split_params_into_different_moe_groups_for_optimizer({"params": list(net.parameters()), "name": "net"})
    optimizer = torch.optim.AdamW(groups, lr=1e-2)
    config = {"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": 0}, "steps_per_print": 10_000, "wall_clock_breakdown": False}
    engine, *_ = deepspeed.initialize(model=net, optimizer=optimizer, config=config)
    return engine, ffn


def _two_rank_worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2", DS_ACCELERATOR="cpu", TORCH_EXTENSIONS_DIR=str(Path(out_dir) / "ext"))
    torch.set_num_threads(1)
    from distillery.platform.engine.worker import init_deepspeed_comm

    init_deepspeed_comm(False, auto_mpi_discovery=False)
    out = Path(out_dir)
    result: dict = {"rank": rank}
    try:
        engine, ffn = _engine(seed=0)
        layer = engine.module.ffn
        result["local_experts"] = len(layer.local_experts)

        # Step 0: the expert-parallel layer (all-to-all over 2 ranks) is the dense FFN.
        g = torch.Generator().manual_seed(100 + rank)
        h = torch.randn(6, 5, D, generator=g)
        engine.eval()
        with torch.no_grad():
            result["step0_error"] = (layer(h) - ffn(h)).abs().max().item()

        # A few data-parallel steps, a different batch per rank.
        engine.train()
        before = [p.detach().clone() for p in layer.local_experts[0].parameters()]
        losses = []
        for step in range(3):
            x = torch.randn(8, D, generator=g)
            target = torch.randn(8, generator=g)
            loss = (engine(x) - target).pow(2).mean() + layer.aux_loss
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
        result["losses"] = losses
        result["experts_moved"] = any(not torch.equal(a, b) for a, b in
                                      zip(before, layer.local_experts[0].parameters()))
        shared = engine.module.inp.weight.detach().clone()
        both = [torch.empty_like(shared) for _ in range(2)]
        dist.all_gather(both, shared)
        result["shared_params_agree"] = torch.equal(both[0], both[1])

        engine.eval()
        x_eval = torch.randn(10, D, generator=torch.Generator().manual_seed(7))
        with torch.no_grad():
            y_ref = engine(x_eval)
            plain = gather_moe_ffn(layer).eval()
            hidden = engine.module.inp(x_eval)
            result["gathered_error"] = (plain(hidden) - layer(hidden)).abs().max().item()
        engine.save_checkpoint(str(out / "ckpt"), tag="step3")

        fresh, _ = _engine(seed=1)
        fresh.eval()
        with torch.no_grad():
            result["fresh_differs"] = not torch.allclose(fresh(x_eval), y_ref)
        fresh.load_checkpoint(str(out / "ckpt"), tag="step3")
        fresh.eval()
        with torch.no_grad():
            result["reload_error"] = (fresh(x_eval) - y_ref).abs().max().item()
    finally:
        (out / f"rank{rank}.json").write_text(json.dumps(result))
        dist.barrier()
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_expert_parallel_train_save_load(tmp_path):
    mp.spawn(_two_rank_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for r in results:
        assert r["local_experts"] == 2, r
        assert r["step0_error"] < 1e-5, r
        assert len(r["losses"]) == 3 and all(l == l and abs(l) < 1e6 for l in r["losses"]), r
        assert r["experts_moved"] and r["shared_params_agree"], r
        assert r["gathered_error"] < 1e-5, r
        assert r["fresh_differs"], r
        assert r["reload_error"] < 1e-6, r
    # The engine's DeepSpeed start on CPU compiled no C++ extension (its shared-memory kernel is off).
    assert not (tmp_path / "ext").exists()
    shards = sorted(p.name for p in (tmp_path / "ckpt" / "step3").glob("*expert*"))
    assert shards == [f"layer_0_expert_{e}_mp_rank_00_model_states.pt" for e in range(4)], shards
