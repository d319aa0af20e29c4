"""Open-vocabulary detector (region-text head on RT-DETRv4 parts) and MoE-tuning of its decoder."""

from __future__ import annotations

import copy

import pytest
import torch

from distillery.students.criterion import build_criterion
from distillery.students.moe import MoEFFN
from distillery.students.open_vocab import (
    OpenVocabDetector,
    build_open_vocab,
    build_open_vocab_criterion,
    moe_layer_names,
    moe_tune_decoder,
)
from distillery.students.phrase_cache import PhraseEmbeddingCache
from distillery.students.text import HashingPhraseEncoder

SHAPES = ["circle", "square", "triangle", "star", "ring", "cross"]
UNSEEN = ["zebra crossing", "hexagon", "kite", "lighthouse"]
SIZE = 64   # 8x8 + 4x4 + 2x2 = 84 memory tokens for the tiny student's 30 queries


@pytest.fixture(scope="module")
def encoder():
    return HashingPhraseEncoder(dim=32)


@pytest.fixture(scope="module")
def cache():
    return PhraseEmbeddingCache()


def tiny(encoder, cache, phrases=SHAPES, seed=0, **overrides) -> OpenVocabDetector:
    torch.manual_seed(seed)
    return build_open_vocab("rtdetrv4_tiny", phrases, encoder=encoder, cache=cache, eval_spatial_size=SIZE,
                            **overrides)


def trained_looking(model: OpenVocabDetector) -> OpenVocabDetector:
    """Fill the zero-initialised layers (box heads' last layers, LQE) with small random weights, so
    that boxes and quality scores depend on the decoder FFNs as they do after training."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return model


def images(n=2, seed=1) -> torch.Tensor:
    return torch.rand(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def targets() -> list[dict[str, torch.Tensor]]:
    return [{"labels": torch.tensor([1, 4]), "boxes": torch.tensor([[0.5, 0.5, 0.3, 0.2], [0.25, 0.3, 0.1, 0.1]])},
            {"labels": torch.tensor([0]), "boxes": torch.tensor([[0.6, 0.4, 0.2, 0.4]])}]


# ---------------------------------------------------------------------------- the vocabulary
def test_scores_follow_the_vocabulary_and_unseen_categories_run(encoder, cache):
    model = tiny(encoder, cache).eval()
    x = images()
    with torch.no_grad():
        out = model(x)
    assert out["pred_logits"].shape == (2, 30, len(SHAPES)) and out["pred_boxes"].shape == (2, 30, 4)

    # A permutation of the prompts permutes the score columns (query selection takes the max
    # over the vocabulary, which a permutation leaves alone).
    order = [3, 0, 5, 1, 4, 2]
    permuted = copy.deepcopy(model)
    permuted.set_vocabulary([SHAPES[i] for i in order], cache.get(encoder, [SHAPES[i] for i in order]))
    with torch.no_grad():
        out_p = permuted(x)
    assert torch.allclose(out_p["pred_logits"], out["pred_logits"][..., order], atol=1e-5)
    assert torch.allclose(out_p["pred_boxes"], out["pred_boxes"], atol=1e-6)

    # Another vocabulary, of another size, with words never trained on: same weights, new scores.
    unseen = cache.get(encoder, UNSEEN)
    with torch.no_grad():
        out_u = model(x, text=unseen)
    assert out_u["pred_logits"].shape == (2, 30, len(UNSEEN))
    assert torch.isfinite(out_u["pred_logits"]).all()
    assert ((out_u["pred_boxes"] >= 0) & (out_u["pred_boxes"] <= 1)).all()
    # Swapping one phrase changes that phrase's scores (only the text side differs).
    swapped = SHAPES[:-1] + ["hexagon"]
    with torch.no_grad():
        out_s = model(x, text=cache.get(encoder, swapped))
    assert (out_s["pred_logits"][..., -1] - out["pred_logits"][..., -1]).abs().max() > 1e-3
    # text= is for one call: the model keeps its own vocabulary and class count.
    assert model.phrases == SHAPES and model.num_classes == len(SHAPES)
    model.set_vocabulary(UNSEEN, unseen)
    with torch.no_grad():
        assert torch.equal(model(x)["pred_logits"], out_u["pred_logits"])
    assert model.num_classes == len(UNSEEN)


def test_training_over_the_prompt_vocabulary(encoder, cache):
    model = tiny(encoder, cache).train()
    criterion = build_open_vocab_criterion(model)
    out = model(images(), targets())
    assert out["pred_logits"].shape[-1] == len(SHAPES) and "dn_outputs" in out
    losses = criterion(out, targets())
    loss = torch.stack(list(losses.values())).sum()
    assert torch.isfinite(loss) and loss > 0
    loss.backward()
    head = model.decoder.dec_score_head[-1].head
    for p in (head.query_proj.weight, head.logit_scale, head.bias, model.decoder.denoising_class_embed.proj.weight,
              model.decoder.enc_score_head.head.query_proj.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert not model.text_embeddings.requires_grad

    # The vocabulary is an input: a training batch over another (smaller) prompt list works too.
    model.zero_grad()
    other = cache.get(encoder, UNSEEN)
    tg = [{"labels": torch.tensor([3]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}] * 2
    out = model(images(), tg, text=other)
    assert out["pred_logits"].shape[-1] == len(UNSEEN)
    loss = torch.stack(list(build_criterion(num_classes=len(UNSEEN))(out, tg).values())).sum()
    loss.backward()
    assert torch.isfinite(loss) and model.decoder.dec_score_head[-1].head.query_proj.weight.grad is not None


def test_weights_do_not_depend_on_the_vocabulary(encoder, cache):
    a = tiny(encoder, cache, seed=1)
    b = tiny(encoder, cache, phrases=UNSEEN, seed=2)
    state = a.state_dict()
    assert not any("text_embeddings" in k for k in state)
    b.load_state_dict(state, strict=True)   # a checkpoint fits any vocabulary
    b.set_vocabulary(a.phrases, a.text_embeddings)
    a.eval(), b.eval()
    with torch.no_grad():
        assert torch.equal(a(images())["pred_logits"], b(images())["pred_logits"])


def test_build_errors_name_the_problem(encoder, cache):
    with pytest.raises(KeyError, match="unknown student 'rtdetrv9'"):
        build_open_vocab("rtdetrv9", SHAPES, encoder=encoder)
    with pytest.raises(TypeError, match=r"\['num_classes'\] are set by the open-vocabulary model"):
        build_open_vocab("rtdetrv4_tiny", SHAPES, encoder=encoder, num_classes=6)
    with pytest.raises(TypeError, match="unknown option"):
        build_open_vocab("rtdetrv4_tiny", SHAPES, encoder=encoder, text_width=3)
    with pytest.raises(ValueError, match=r"must be \(6, dim\)"):
        build_open_vocab("rtdetrv4_tiny", SHAPES, phrase_embeddings=torch.randn(5, 32))
    model = tiny(encoder, cache)
    with pytest.raises(ValueError, match="3 phrases but 2 embeddings"):
        model.set_vocabulary(["a", "b", "c"], torch.randn(2, 32))
    with pytest.raises(ValueError, match=r"must be \(P >= 1, 32\)"):
        model(images(), text=torch.randn(4, 16))
    with pytest.raises(RuntimeError, match="inside OpenVocabDetector.forward"):
        model.decoder.dec_score_head[0](torch.randn(1, 3, 64))


# ---------------------------------------------------------------------------- MoE-tuning
@pytest.mark.parametrize("copies,granularity", [(1, 1), (4, 1), (2, 2), (16, 2), (4, 4)])
def test_moe_tuned_detector_equals_dense_at_step0(encoder, cache, copies, granularity):
    dense = trained_looking(tiny(encoder, cache, seed=copies + granularity)).eval()
    moe = copy.deepcopy(dense)
    names = moe_tune_decoder(moe, copies, granularity)
    assert names == [f"decoder.layers.{i}" for i in range(2)]
    assert moe_layer_names(moe) == [f"decoder.layers.{i}.linear1" for i in range(2)]
    assert all(isinstance(moe.get_submodule(n), MoEFFN) for n in moe_layer_names(moe))
    x = images(3, seed=copies)
    with torch.no_grad():
        d, m = dense(x), moe(x)
    for key in ("pred_logits", "pred_boxes"):
        assert (m[key] - d[key]).abs().max().item() < 1e-5, (key, copies, granularity)

    # Bookkeeping: a token uses k experts of width h/k (the dense FFN's weights, b2 counted k times)
    # plus the router (a row per copy and a residual row per expert).
    d_model, layers = 64, 2
    dense_counts, moe_counts = dense.parameter_counts(), moe.parameter_counts()
    assert dense_counts["active"] == dense_counts["total"]
    router = copies * d_model + copies * granularity * d_model
    assert moe_counts["active"] == dense_counts["total"] + layers * (router + (granularity - 1) * d_model)
    # Total: N copies of W1, b1, W2 and N * k pieces of b2 in place of one FFN, plus the router.
    assert moe_counts["total"] == dense_counts["total"] + layers * (
        router + (copies - 1) * (2 * 64 * 128 + 128) + (copies * granularity - 1) * d_model)


def test_moe_tuned_detector_equals_dense_in_training_mode(encoder, cache):
    """Every training output (all layers, denoising queries, encoder proposals) is unchanged too."""
    dense = trained_looking(tiny(encoder, cache, seed=5)).train()
    moe = copy.deepcopy(dense)
    moe_tune_decoder(moe, 16, 2)
    x = images()
    torch.manual_seed(0)
    d = dense(x, targets())
    torch.manual_seed(0)   # the same denoising noise
    m = moe(x, targets())
    pairs = [(d, m), *zip(d["aux_outputs"], m["aux_outputs"]), *zip(d["dn_outputs"], m["dn_outputs"])]
    for a, b in pairs:
        for key in ("pred_logits", "pred_boxes", "pred_corners"):
            assert (a[key] - b[key]).abs().max().item() < 1e-5, key
    criterion = build_open_vocab_criterion(dense)
    ld = torch.stack(list(criterion(d, targets()).values())).sum()
    lm = torch.stack(list(criterion(m, targets()).values())).sum()
    assert abs(ld.item() - lm.item()) < 1e-4 * max(1.0, abs(ld.item()))
