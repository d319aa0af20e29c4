"""RT-DETRv4 criterion (DEIM loss set) on the tiny student: values, names, weights, gradients."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from distillery.students import DEFAULT_LOSS_WEIGHTS, build_criterion, build_student, dsi_loss

SIZE = 128


def _targets(with_empty: bool = True) -> list[dict[str, torch.Tensor]]:
    second = ({"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)} if with_empty else
              {"labels": torch.tensor([2]), "boxes": torch.tensor([[0.7, 0.2, 0.1, 0.3]])})
    return [
        {"labels": torch.tensor([1, 5, 7]),
         "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.5, 0.3, 0.4], [0.5, 0.5, 0.9, 0.9]])},
        second,
    ]


def _perturbed_tiny(seed: int = 0):
    """Tiny student whose decoder heads are no longer at their (zero) init, so layers disagree."""
    torch.manual_seed(seed)
    model = build_student("rtdetrv4_tiny")
    with torch.no_grad():
        for p in model.decoder.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.train()


def test_loss_names_values_and_gradients():
    model = _perturbed_tiny()
    criterion = build_criterion(80)
    targets = _targets(with_empty=True)
    out = model(torch.rand(2, 3, SIZE, SIZE), targets)
    losses = criterion(out, targets)

    layers = model.spec.num_decoder_layers
    expected = {"loss_mal", "loss_bbox", "loss_giou", "loss_fgl"}
    for i in range(layers - 1):
        expected |= {f"loss_{k}_aux_{i}" for k in ("mal", "bbox", "giou", "fgl", "ddf")}
    expected |= {f"loss_{k}_pre" for k in ("mal", "bbox", "giou")}
    expected |= {f"loss_{k}_enc_0" for k in ("mal", "bbox", "giou")}
    for i in range(layers):
        expected |= {f"loss_{k}_dn_{i}" for k in ("mal", "bbox", "giou", "fgl")}
        if i < layers - 1:
            expected.add(f"loss_ddf_dn_{i}")
    expected |= {f"loss_{k}_dn_pre" for k in ("mal", "bbox", "giou")}
    assert set(losses) == expected
    for name, value in losses.items():
        assert value.dim() == 0 and torch.isfinite(value), name
        assert value >= 0, name
    assert losses["loss_ddf_aux_0"] > 0  # the intermediate layer disagrees with the last one

    total = sum(losses.values()) + dsi_loss(out["f5"], torch.randn(2, 768, 7, 9), model.dsi)
    total.backward()
    grads = {c: 0.0 for c in ("backbone", "aifi", "ccff", "decoder", "dsi")}
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} received no gradient"
        grads[model.component_of(name)] += p.grad.abs().sum().item()
    for component, norm in grads.items():
        assert norm > 0 and math.isfinite(norm), component


def test_batch_without_objects():
    model = _perturbed_tiny(1)
    empty = [{"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)}] * 2
    out = model(torch.rand(2, 3, SIZE, SIZE), empty)
    losses = build_criterion(80)(out, empty)
    assert not any("_dn_" in k for k in losses)
    assert all(torch.isfinite(v) for v in losses.values())
    # Every query is a negative: classification still learns, and DDF still distils the unmatched
    # queries' distributions toward the last layer; box and FGL losses have nothing to match.
    assert losses["loss_mal"] > 0 and losses["loss_ddf_aux_0"] > 0
    for name, value in losses.items():
        if name.startswith(("loss_bbox", "loss_giou", "loss_fgl")):
            assert value == 0, name
    sum(losses.values()).backward()
    assert model.decoder.dec_score_head[-1].bias.grad.abs().sum() > 0


def test_weights_are_applied_and_checked():
    model = _perturbed_tiny(2)
    targets = _targets(with_empty=False)
    torch.manual_seed(5)
    out = model(torch.rand(2, 3, SIZE, SIZE), targets)
    base = build_criterion(80)(out, targets)
    heavier = build_criterion(80, weight_dict={"loss_bbox": 10.0, "loss_fgl": 0.3})(out, targets)
    for name in base:
        factor = 2.0 if name.startswith(("loss_bbox", "loss_fgl")) else 1.0
        torch.testing.assert_close(heavier[name], base[name] * factor, msg=name)
    assert DEFAULT_LOSS_WEIGHTS == {"loss_mal": 1.0, "loss_bbox": 5.0, "loss_giou": 2.0, "loss_fgl": 0.15,
                                    "loss_ddf": 1.5}
    with pytest.raises(KeyError, match="loss_vfl"):
        build_criterion(80, weight_dict={"loss_vfl": 1.0})
    with pytest.raises(TypeError, match="epoch"):
        build_criterion(80, epoch=3)
    with pytest.raises(KeyError, match="train-mode"):
        build_criterion(80)({"pred_logits": out["pred_logits"], "pred_boxes": out["pred_boxes"]}, targets)


def test_mal_matches_hand_computation():
    """One image, 3 queries, 2 classes, 1 object matched to query 1."""
    criterion = build_criterion(2)
    logits = torch.tensor([[[0.5, -1.0], [2.0, 0.3], [-0.2, 0.1]]])
    boxes = torch.tensor([[[0.2, 0.2, 0.1, 0.1], [0.5, 0.5, 0.4, 0.4], [0.8, 0.8, 0.2, 0.2]]])
    target = {"labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.2]])}
    loss = criterion.loss_mal({"pred_logits": logits, "pred_boxes": boxes}, [target],
                              [(torch.tensor([1]), torch.tensor([0]))], num_boxes=1.0, num_classes=2)
    iou = 0.5  # 0.4 x 0.2 inside 0.4 x 0.4
    gamma = 1.5
    expected = 0.0
    for q in range(3):
        for c in range(2):
            x = logits[0, q, c]
            p = torch.sigmoid(x)
            if (q, c) == (1, 0):
                t = iou ** gamma
                expected += -(t * torch.log(p) + (1 - t) * torch.log(1 - p))  # weight 1
            else:
                expected += -(p ** gamma) * torch.log(1 - p)  # target 0, weight p^gamma
    torch.testing.assert_close(loss, expected)


def test_fgl_is_smallest_at_the_target_distribution():
    """FGL of a matched query is minimised by the two-bin target distribution it is built from."""
    criterion = build_criterion(1)
    reg_max = 32
    ref = torch.tensor([[[0.5, 0.5, 0.4, 0.4]]])
    target = {"labels": torch.tensor([0]), "boxes": torch.tensor([[0.52, 0.49, 0.42, 0.37]])}
    from distillery.students.box_ops import edge_distance_bins

    left, wr, wl = edge_distance_bins(ref[0], torch.tensor([[0.31, 0.305, 0.73, 0.675]]), reg_max, 4.0, 0.5)
    ideal = torch.full((4, reg_max + 1), -30.0)
    for e in range(4):
        li = int(left[e])
        ideal[e, li], ideal[e, li + 1] = torch.log(wl[e] + 1e-9), torch.log(wr[e] + 1e-9)

    def fgl(corners: torch.Tensor) -> float:
        outputs = {"pred_corners": corners.reshape(1, 1, -1), "ref_points": ref, "pred_boxes": target["boxes"][None]}
        return criterion.loss_local(outputs, [target], [(torch.tensor([0]), torch.tensor([0]))], 1.0,
                                    reg_scale=4.0, up=0.5, ddf_balance={})["loss_fgl"].item()

    best = fgl(ideal)
    for seed in range(3):
        noise = torch.randn(4, reg_max + 1, generator=torch.Generator().manual_seed(seed))
        assert fgl(ideal + noise) > best
    # The minimum is the entropy of the two-bin targets (IoU weight is 1 here).
    entropy = -(wl * torch.log(wl.clamp_min(1e-12)) + wr * torch.log(wr.clamp_min(1e-12))).sum()
    assert best == pytest.approx(entropy.item(), abs=1e-3)


def test_ddf_zero_when_layers_agree():
    model = build_student("rtdetrv4_tiny").train()  # zero-initialised heads: all layers identical
    targets = _targets(with_empty=False)
    out = model(torch.rand(2, 3, SIZE, SIZE), targets)
    losses = build_criterion(80)(out, targets)
    assert losses["loss_ddf_aux_0"] == 0
    torch.testing.assert_close(F.softmax(out["aux_outputs"][0]["pred_corners"], -1),
                               F.softmax(out["pred_corners"], -1))


def test_negative_predicted_size_is_clamped_to_zero_as_officially():
    """The official box_cxcywh_to_xyxy clamps w/h to >= 0 before IoU/GIoU: a box of size (-0.2, 0.3)
    scores as the zero-width box at its centre, not as the box with its x corners swapped."""
    criterion = build_criterion(2)
    target = {"labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]])}
    negative = torch.tensor([[[0.5, 0.5, -0.2, 0.3]]])
    zero_width = torch.tensor([[[0.5, 0.5, 0.0, 0.3]]])
    match = [(torch.tensor([0]), torch.tensor([0]))]
    got = criterion.loss_boxes({"pred_boxes": negative}, [target], match, num_boxes=1.0)
    clamped = criterion.loss_boxes({"pred_boxes": zero_width}, [target], match, num_boxes=1.0)
    # GIoU of the zero-width 0 x 0.3 box in the 0.4 x 0.4 target: IoU 0, hull = union = 0.16 -> GIoU 0.
    torch.testing.assert_close(got["loss_giou"], torch.tensor(1.0))
    torch.testing.assert_close(got["loss_giou"], clamped["loss_giou"])
    torch.testing.assert_close(got["loss_bbox"], torch.tensor(0.6 + 0.1))  # L1 on the raw cxcywh
    logits = torch.tensor([[[1.0, -1.0]]])
    mal = criterion.loss_mal({"pred_logits": logits, "pred_boxes": negative}, [target], match, 1.0, 2)
    mal_zero = criterion.loss_mal({"pred_logits": logits, "pred_boxes": zero_width}, [target], match, 1.0, 2)
    torch.testing.assert_close(mal, mal_zero)


def test_each_size_has_its_official_criterion_settings():
    from distillery.students.criterion import OFFICIAL_CRITERION_OPTIONS, criterion_options
    from distillery.students.deimv2 import DEIMV2_SPECS
    from distillery.students.rtdetrv4 import STUDENT_SPECS

    assert set(OFFICIAL_CRITERION_OPTIONS) == {*STUDENT_SPECS, *DEIMV2_SPECS}
    change = {name: criterion_options(name).get("matcher_change_epoch") for name in OFFICIAL_CRITERION_OPTIONS}
    assert change == {"rtdetrv4_s": None, "rtdetrv4_m": None, "rtdetrv4_l": None, "rtdetrv4_x": None,
                      "rtdetrv4_tiny": None, "deimv2_n": 136, "deimv2_s": 100, "deimv2_m": 80, "deimv2_l": 50,
                      "deimv2_x": 45, "deimv2_pico": 450, "deimv2_femto": 450, "deimv2_atto": 450,
                      "deimv2_tiny": 100}
    for name in ("deimv2_pico", "deimv2_femto", "deimv2_atto"):
        assert criterion_options(name) == {"local_losses": False, "use_union_set": False,
                                           "matcher_change_epoch": 450, "iou_order_alpha": 4.0}
    assert criterion_options("deimv2_pico", {"matcher_change_epoch": 5})["matcher_change_epoch"] == 5
    criterion_options("deimv2_pico")["local_losses"] = True  # a copy: the table is unchanged
    assert criterion_options("deimv2_pico")["local_losses"] is False
    with pytest.raises(KeyError, match="yolo"):
        criterion_options("yolo")


def test_ultralight_criterion_terms_and_the_epoch_reaching_the_matcher():
    """Pico's official loss set: MAL and boxes only, each set's own matching; set_epoch switches the matcher."""
    from distillery.students.criterion import criterion_options

    torch.manual_seed(0)
    model = build_student("deimv2_pico", num_classes=8, eval_spatial_size=SIZE, encoder_hidden_dim=32,
                          decoder_hidden_dim=32, decoder_ffn_dim=64, num_queries=12, num_denoising=6).train()
    targets = _targets(with_empty=False)
    out = model(torch.rand(2, 3, SIZE, SIZE), targets)
    criterion = build_criterion(8, **criterion_options("deimv2_pico"))
    losses = criterion(out, targets)
    assert {k.split("_")[1] for k in losses} == {"mal", "bbox", "giou"}
    assert not criterion.use_union_set and not criterion.matcher.changed
    criterion.set_epoch(449)
    assert not criterion.matcher.changed
    criterion.set_epoch(450)
    assert criterion.matcher.changed and criterion.matcher.iou_order_alpha == 4.0
    changed = criterion(out, targets)
    assert sorted(changed) == sorted(losses) and all(torch.isfinite(v) for v in changed.values())
    assert any(abs(changed[k].item() - losses[k].item()) > 1e-6 for k in losses)  # other matches, other losses
