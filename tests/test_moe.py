"""Dynamic-DINO MoE in plain PyTorch: step-0 equivalence, the gate, capacity, bookkeeping, analysis."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from distillery.students.moe import (
    DEFAULT_AUX_LOSS_WEIGHT,
    MoEFFN,
    coactivation_matrix,
    collect_aux_loss,
    collect_routing_traces,
    expert_load,
    ffn_parts,
    moe_parameter_counts,
    replace_decoder_ffns,
    route_top_k,
    split_ffn_into_experts,
    stable_partners,
    summarise_layers,
)

D, H = 16, 48   # 48 is divisible by 1, 2, 3, 4
CASES = [(1, 1), (2, 2), (4, 2), (16, 2), (3, 4)]


class AttrFFN(nn.Module):
    """Duck-typed FFN, nn.TransformerDecoderLayer naming; the activation is a plain function."""

    def __init__(self, d, h, p=0.1):
        super().__init__()
        self.linear1 = nn.Linear(d, h)
        self.activation = F.relu
        self.dropout = nn.Dropout(p)
        self.linear2 = nn.Linear(h, d)

    def forward(self, x):
        return self.linear2(self.dropout(self.activation(self.linear1(x))))


class ScannedFFN(nn.Module):
    """FFN with its own attribute names: found by scanning children in order."""

    def __init__(self, d, h):
        super().__init__()
        self.fc_in = nn.Linear(d, h)
        self.act = nn.SiLU()
        self.drop = nn.Dropout(0.0)
        self.fc_out = nn.Linear(h, d)

    def forward(self, x):
        return self.fc_out(self.drop(self.act(self.fc_in(x))))


def make_ffn(kind: str, d: int = D, h: int = H) -> nn.Module:
    if kind == "sequential":
        return nn.Sequential(nn.Linear(d, h), nn.GELU(), nn.Dropout(0.1), nn.Linear(h, d))
    if kind == "attributes":
        return AttrFFN(d, h)
    if kind == "scanned":
        return ScannedFFN(d, h)
    raise ValueError(kind)


# ---------------------------------------------------------------------------- step-0 equivalence
@pytest.mark.parametrize("kind", ["sequential", "attributes", "scanned"])
@pytest.mark.parametrize("copies,granularity", CASES)
def test_step0_output_equals_dense(kind, copies, granularity):
    torch.manual_seed(copies * 10 + granularity)
    ffn = make_ffn(kind).eval()
    moe = split_ffn_into_experts(ffn, copies, granularity).eval()
    for shape in [(1, D), (2, 7, D), (300, D)]:
        x = torch.randn(shape) * 3
        with torch.no_grad():
            dense, mixed = ffn(x), moe(x)
        assert mixed.shape == dense.shape
        assert (mixed - dense).abs().max().item() < 1e-5, (kind, copies, granularity, shape)

        routing = moe.route(x.reshape(-1, D))
        chosen_copy = routing.expert_index // granularity
        assert (chosen_copy == chosen_copy[:, :1]).all(), "top-k must select the k pieces of one copy"
        pieces = torch.sort(routing.expert_index % granularity, dim=1).values
        assert torch.equal(pieces, torch.arange(granularity).expand_as(pieces))
        assert (routing.combine_weight == 1.0).all(), "each selected piece must get weight exactly 1"


def test_pieces_of_a_copy_tie_bit_for_bit_even_for_one_token():
    # A Linear with equal rows can give unequal logits (BLAS accumulates columns differently);
    # the copy-shared router parameterisation must not.
    torch.manual_seed(0)
    moe = split_ffn_into_experts(make_ffn("sequential", 256, 256), 3, 4)
    for tokens in (1, 5, 64):
        logits = moe.router(torch.randn(tokens, 256)).view(tokens, 3, 4)
        assert torch.equal(logits, logits[..., :1].expand_as(logits))


def test_ties_between_copies_go_to_the_lowest_copy_whole():
    torch.manual_seed(1)
    ffn = make_ffn("sequential").eval()
    moe = split_ffn_into_experts(ffn, 4, 2).eval()
    # All-zero tokens: every logit is 0, every expert ties.
    zeros = torch.zeros(5, D)
    assert torch.equal(moe.route(zeros).expert_index, torch.tensor([[0, 1]] * 5))
    with torch.no_grad():
        assert (moe(zeros) - ffn(zeros)).abs().max().item() < 1e-6
    # Copies 1 and 3 identical and the best: copy 1 wins with both pieces.
    with torch.no_grad():
        moe.router.copy_weight.zero_()
        moe.router.copy_weight[1] = 1.0
        moe.router.copy_weight[3] = 1.0
    x = torch.rand(6, D) + 0.1  # positive: copies 1 and 3 lead with equal logits
    assert torch.equal(moe.route(x).expert_index, torch.tensor([[2, 3]] * 6))
    with torch.no_grad():
        assert (moe(x) - ffn(x)).abs().max().item() < 1e-5


def test_routing_not_exact_if_pieces_could_mix():
    # The counterfactual the tie rule prevents: a mix of pieces 0 of two copies is not the FFN.
    torch.manual_seed(2)
    ffn = make_ffn("sequential").eval()
    moe = split_ffn_into_experts(ffn, 2, 2).eval()
    x = torch.randn(4, D)
    with torch.no_grad():
        p0 = moe.expert_ffn(0)(x) + moe.expert_ffn(2)(x)   # piece 0 of copy 0 + piece 0 of copy 1
        whole = moe.expert_ffn(2)(x) + moe.expert_ffn(3)(x)
        assert (whole - ffn(x)).abs().max() < 1e-5
        assert (p0 - ffn(x)).abs().max() > 1e-2


# ---------------------------------------------------------------------------- decomposition
def test_decomposition_shapes_and_slices():
    torch.manual_seed(3)
    ffn = make_ffn("sequential")
    copies, k = 3, 4
    moe = split_ffn_into_experts(ffn, copies, k)
    E, he = copies * k, H // k
    assert isinstance(moe, MoEFFN)
    assert (moe.num_experts, moe.top_k, moe.expert_hidden) == (E, k, he)
    assert moe.w1.shape == (E, he, D) and moe.b1.shape == (E, he)
    assert moe.w2.shape == (E, D, he) and moe.b2.shape == (E, D)
    W1, b1, W2, b2 = ffn[0].weight, ffn[0].bias, ffn[3].weight, ffn[3].bias
    for c in range(copies):
        for j in range(k):
            e = c * k + j
            rows = slice(j * he, (j + 1) * he)
            assert torch.equal(moe.w1[e], W1[rows])
            assert torch.equal(moe.b1[e], b1[rows])
            assert torch.equal(moe.w2[e], W2[:, rows])
            assert torch.allclose(moe.b2[e], b2 / k)
    # Router rows replicated within a copy, distinct between copies.
    W = moe.router.weight
    assert torch.equal(W[0], W[1]) and torch.equal(W[0], W[3])
    assert not torch.equal(W[0], W[k])
    # Activation and dropout carried over.
    assert isinstance(moe.activation, nn.GELU) and moe.dropout.p == pytest.approx(0.1)


def test_sum_of_pieces_of_each_copy_is_the_dense_ffn():
    torch.manual_seed(4)
    ffn = make_ffn("attributes").eval()
    moe = split_ffn_into_experts(ffn, 2, 3).eval()
    x = torch.randn(10, D)
    with torch.no_grad():
        for c in range(2):
            total = sum(moe.expert_ffn(c * 3 + j).eval()(x) for j in range(3))
            assert (total - ffn(x)).abs().max().item() < 1e-5


def test_parameter_bookkeeping_total_and_active():
    d, h, copies, k = 8, 16, 4, 2
    E, he = copies * k, h // k
    moe = split_ffn_into_experts(nn.Sequential(nn.Linear(d, h), nn.ReLU(), nn.Linear(h, d)), copies, k)
    router = copies * d + E * d           # copy-shared rows + per-expert residual rows
    expert = he * d + he + d * he + d
    assert moe.expert_parameter_count() == expert
    assert moe_parameter_counts(moe) == {"total": router + E * expert, "active": router + k * expert}
    # Inside a bigger model: everything outside the MoE layers is active.
    model = nn.Sequential(nn.Linear(d, d), moe, nn.Linear(d, 3))
    other = (d * d + d) + (d * 3 + 3)
    assert moe_parameter_counts(model) == {"total": other + router + E * expert,
                                           "active": other + router + k * expert}
    # A dense model: total == active.
    dense = nn.Linear(d, d)
    assert moe_parameter_counts(dense) == {"total": d * d + d, "active": d * d + d}


# ---------------------------------------------------------------------------- gate on hand-made logits
def test_gate_top2_weights_and_aux_loss_by_hand():
    logits = torch.tensor([[2.0, 1.0, 0.0, 0.0],
                           [0.0, 0.0, 3.0, 3.0],
                           [0.0, 5.0, 4.0, 0.0]])
    r = route_top_k(logits, k=2)
    assert r.expert_index.tolist() == [[0, 1], [2, 3], [1, 2]]
    e = math.e
    expected_w = [[2 * e / (e + 1), 2 / (e + 1)], [1.0, 1.0], [2 * e / (e + 1), 2 / (e + 1)]]
    assert torch.allclose(r.combine_weight, torch.tensor(expected_w), atol=1e-6)
    # Softmax rows by hand.
    rows = []
    for row in logits.tolist():
        z = sum(math.exp(v) for v in row)
        rows.append([math.exp(v) / z for v in row])
    P = [sum(rows[t][i] for t in range(3)) / 3 for i in range(4)]
    f = [1 / 6, 2 / 6, 2 / 6, 1 / 6]        # routes per expert / (T * k)
    expected_loss = 4 * sum(fi * pi for fi, pi in zip(f, P))
    assert r.balance_loss.item() == pytest.approx(expected_loss, rel=1e-6)
    assert r.capacity is None and r.kept.all()


def test_gate_top1_and_uniform_aux_loss():
    logits = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    r = route_top_k(logits, k=1)
    assert r.expert_index.tolist() == [[0], [1]]
    assert torch.equal(r.combine_weight, torch.ones(2, 1))   # k * softmax over one logit
    # Balanced routing and symmetric probabilities: E * sum(1/2 * 1/2) * ... = 1.
    assert r.balance_loss.item() == pytest.approx(1.0, rel=1e-6)
    # All tokens to one expert with uniform probabilities still gives 1; with peaked ones, > 1.
    peaked = route_top_k(torch.tensor([[4.0, 0.0], [4.0, 0.0]]), k=1)
    p = math.exp(4) / (math.exp(4) + 1)
    assert peaked.balance_loss.item() == pytest.approx(2 * (1.0 * p), rel=1e-6)


def test_gate_errors():
    with pytest.raises(ValueError, match="k=3"):
        route_top_k(torch.zeros(2, 2), k=3)
    with pytest.raises(ValueError, match="tokens, experts"):
        route_top_k(torch.zeros(2, 2, 2), k=1)
    with pytest.raises(ValueError, match="capacity_factor"):
        route_top_k(torch.zeros(2, 2), k=1, capacity_factor=0.0)


def test_router_learns_from_step_zero():
    torch.manual_seed(5)
    ffn = make_ffn("sequential").eval()
    moe = split_ffn_into_experts(ffn, 4, 2)
    moe.dropout.p = 0.0
    x = torch.randn(32, D)
    loss = (moe(x) - torch.randn(32, D)).pow(2).mean() + moe.aux_loss
    loss.backward()
    g = moe.router.piece_weight.grad
    assert g is not None and g.abs().sum() > 0
    # The two pieces of a used copy get different gradients, so they can drift apart.
    used = moe.route(x).expert_index[:, 0] // 2
    c = int(used[0])
    assert not torch.allclose(g[2 * c], g[2 * c + 1])


# ---------------------------------------------------------------------------- capacity
def test_capacity_drops_by_priority_then_token_order():
    logits = torch.tensor([[3.0, 2.0, 0.0],
                           [2.0, 3.0, 0.0],
                           [3.0, 0.0, 2.0]])
    r = route_top_k(logits, k=2, capacity_factor=0.5)   # C = ceil(0.5 * 3 * 2 / 3) = 1
    assert r.capacity == 1
    assert r.expert_index.tolist() == [[0, 1], [1, 0], [0, 2]]
    # First choices first: t0->e0, t1->e1 fit; t2->e0 is the second route on e0: dropped.
    # Second choices: t0->e1 and t1->e0 dropped (full), t2->e2 fits.
    assert r.kept.tolist() == [[True, False], [True, False], [False, True]]
    full = route_top_k(logits, k=2)
    assert torch.equal(r.combine_weight, full.combine_weight * r.kept)   # no renormalisation
    # The loss counts the router's choices, not what survived capacity.
    assert r.balance_loss == full.balance_loss


def test_capacity_dropped_tokens_get_zero_output():
    torch.manual_seed(6)
    ffn = nn.Sequential(nn.Linear(D, H), nn.ReLU(), nn.Linear(H, D)).eval()
    moe = split_ffn_into_experts(ffn, 2, 1, capacity_factor=1.0).eval()
    with torch.no_grad():   # every token prefers expert 0
        moe.router.copy_weight.zero_()
        moe.router.piece_weight.zero_()
        moe.router.piece_weight[0, 0] = 1.0
    x = torch.randn(6, D)
    x[:, 0] = 1.0
    with torch.no_grad():
        y = moe(x)
        dense = ffn(x)
    # C = ceil(1.0 * 6 * 1 / 2) = 3: tokens 0..2 served, 3..5 dropped.
    assert (y[:3] - dense[:3]).abs().max() < 1e-5
    assert torch.equal(y[3:], torch.zeros(3, D))


# ---------------------------------------------------------------------------- errors
def test_errors_name_the_problem():
    ffn = nn.Sequential(nn.Linear(D, 10), nn.ReLU(), nn.Linear(10, D))
    with pytest.raises(ValueError, match="does not divide the FFN width 10"):
        split_ffn_into_experts(ffn, 2, 4)
    with pytest.raises(ValueError, match="copies"):
        split_ffn_into_experts(ffn, 0, 2)
    with pytest.raises(ValueError, match="granularity"):
        split_ffn_into_experts(ffn, 2, -1)
    with pytest.raises(ValueError, match="found children"):
        split_ffn_into_experts(nn.Sequential(nn.Linear(D, 8), nn.ReLU(), nn.Linear(8, 8), nn.Linear(8, D)), 1, 1)
    with pytest.raises(ValueError, match="exactly one activation"):
        split_ffn_into_experts(nn.Sequential(nn.Linear(D, 8), nn.Linear(8, D)), 1, 1)
    with pytest.raises(ValueError, match="expected 8->16"):
        ffn_parts(nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(4, 16)))
    moe = split_ffn_into_experts(nn.Sequential(nn.Linear(D, 8), nn.ReLU(), nn.Linear(8, D)), 1, 2)
    with pytest.raises(ValueError, match="d_model=16"):
        moe(torch.zeros(2, 15))


# ---------------------------------------------------------------------------- traces and analysis
def test_aux_loss_and_routing_trace_are_recorded():
    torch.manual_seed(7)
    layers = nn.Sequential(split_ffn_into_experts(make_ffn("sequential"), 4, 2, record_routing=True),
                           split_ffn_into_experts(make_ffn("sequential"), 2, 2))
    assert collect_aux_loss(layers) is None
    x = torch.randn(3, 5, D)
    layers(x)
    layers(x[:1])
    first, second = layers[0], layers[1]
    assert first.aux_loss.item() == pytest.approx(DEFAULT_AUX_LOSS_WEIGHT * first.load_balancing_loss.item())
    assert collect_aux_loss(layers).item() == pytest.approx(first.aux_loss.item() + second.aux_loss.item())
    traces = collect_routing_traces(layers)
    assert list(traces) == ["0"]
    assert traces["0"].shape == (15 + 5, 2) and traces["0"].dtype == torch.long
    assert first.pop_routing_trace().shape == (0, 2)   # collected traces were cleared


def test_expert_analysis_on_a_hand_made_trace():
    trace = torch.tensor([[0, 1], [0, 1], [0, 2], [3, 1]])
    assert expert_load(trace, 4).tolist() == [3, 3, 1, 1]
    co = coactivation_matrix(trace, 4)
    assert co.tolist() == [[3, 2, 1, 0],
                           [2, 3, 0, 1],
                           [1, 0, 1, 0],
                           [0, 1, 0, 1]]
    # Expert 0 meets 1 in 2/3 and 2 in 1/3 of its activations; expert 2 always meets 0.
    assert stable_partners(co, 0.5).tolist() == [1, 1, 1, 1]
    assert stable_partners(co, 0.7).tolist() == [0, 0, 1, 1]
    assert stable_partners(co, 0.2).tolist() == [2, 2, 1, 1]

    summary = summarise_layers({"shallow": trace, "deep": torch.tensor([[0, 1]] * 4)}, num_experts=4,
                               threshold=0.5)
    s = summary["shallow"]
    assert s["tokens"] == 4 and s["load"] == [3, 3, 1, 1]
    assert s["mean_partners"] == pytest.approx(1.5)          # (2 + 2 + 1 + 1) / 4
    assert s["mean_stable_partners"] == pytest.approx(1.0)
    assert s["unique_combinations"] == 3 and s["top_combination_share"] == pytest.approx(0.5)
    assert s["load_cv"] == pytest.approx(1.0 / 2.0)           # std 1, mean 2
    deep = summary["deep"]
    assert deep["unique_combinations"] == 1 and deep["top_combination_share"] == 1.0
    assert deep["mean_partners"] == 1.0 and deep["load"] == [4, 4, 0, 0]

    with pytest.raises(ValueError, match="outside"):
        expert_load(torch.tensor([[0, 4]]), 4)


# ---------------------------------------------------------------------------- decoder replacement
class ToyBlock(nn.Module):
    def __init__(self, d, h):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.ffn = AttrFFN(d, h)

    def forward(self, x):
        return x + self.ffn(self.norm(x))


class InlineLayer(nn.Module):
    """D-FINE decoder-layer style: the FFN parts live on the layer itself."""

    def __init__(self, d, h):
        super().__init__()
        self.linear1 = nn.Linear(d, h)
        self.activation = nn.ReLU()
        self.dropout3 = nn.Dropout(0.1)
        self.linear2 = nn.Linear(h, d)
        self.norm3 = nn.LayerNorm(d)

    def forward(self, x):
        return self.norm3(x + self.linear2(self.dropout3(self.activation(self.linear1(x)))))


def test_replace_decoder_ffns_by_attribute_name():
    torch.manual_seed(8)
    decoder = nn.Sequential(ToyBlock(D, H), ToyBlock(D, H), nn.Linear(D, D)).eval()
    x = torch.randn(2, 6, D)
    with torch.no_grad():
        before = decoder(x)
    names = replace_decoder_ffns(decoder, 4, 2, capacity_factor=None, record_routing=True)
    assert names == ["0.ffn", "1.ffn"]
    assert all(isinstance(decoder[i].ffn, MoEFFN) for i in range(2))
    with torch.no_grad():
        after = decoder(x)
    assert (after - before).abs().max().item() < 1e-5
    assert set(collect_routing_traces(decoder)) == {"0.ffn", "1.ffn"}
    with pytest.raises(ValueError, match="no FFN child named"):
        replace_decoder_ffns(decoder, 4, 2, ffn_attr_name="mlp")


def test_replace_inline_ffns_in_dfine_style_and_torch_decoder_layers():
    torch.manual_seed(9)
    dfine_like = nn.Sequential(InlineLayer(D, H), InlineLayer(D, H)).eval()
    x = torch.randn(2, 5, D)
    with torch.no_grad():
        before = dfine_like(x)
    names = replace_decoder_ffns(dfine_like, 2, 2, inline_parts=("linear1", "activation", "dropout3", "linear2"))
    assert names == ["0", "1"]
    assert isinstance(dfine_like[0].linear1, MoEFFN) and isinstance(dfine_like[0].linear2, nn.Identity)
    with torch.no_grad():
        assert (dfine_like(x) - before).abs().max().item() < 1e-5

    layer = nn.TransformerDecoderLayer(D, 2, dim_feedforward=H, batch_first=True)
    torch_decoder = nn.TransformerDecoder(layer, num_layers=2).eval()
    memory = torch.randn(2, 7, D)
    with torch.no_grad():
        before = torch_decoder(x, memory)
    names = replace_decoder_ffns(torch_decoder, 2, 3, inline_parts=("linear1", "activation", "dropout", "linear2"))
    assert names == ["layers.0", "layers.1"]
    with torch.no_grad():
        assert (torch_decoder(x, memory) - before).abs().max().item() < 1e-5


# ---------------------------------------------------------------------------- export
def test_onnx_export_matches_pytorch(tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime")
    torch.manual_seed(10)
    ffn = nn.Sequential(nn.Linear(D, H), nn.GELU(), nn.Linear(H, D)).eval()
    moe = split_ffn_into_experts(ffn, 4, 2).eval()
    with torch.no_grad():   # move away from step 0 so the export routes non-trivially
        moe.router.piece_weight.normal_(0, 0.5)
        moe.w1.add_(torch.randn_like(moe.w1) * 0.1)
    path = tmp_path / "moe.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(moe, (torch.randn(2, 5, D),), str(path), dynamo=False, input_names=["x"],
                          output_names=["y"], dynamic_axes={"x": {0: "batch", 1: "tokens"}})
    session = onnxruntime.InferenceSession(str(path))
    for x in (torch.randn(2, 5, D), torch.randn(3, 11, D), torch.zeros(1, 4, D)):
        (y,) = session.run(None, {"x": x.numpy()})
        with torch.no_grad():
            expected = moe(x).numpy()
        assert abs(y - expected).max() < 1e-5
