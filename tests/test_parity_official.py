"""Parity with the official RT-DETRv4 / DEIMv2 code, from fixtures written by the official code itself.

Each fixture (``tests/fixtures/parity/<case>.{safetensors,json}``, written by
``tools/parity/write_fixtures.py`` from the official repositories at the commit recorded in the
json) holds a reduced official model's state dict in the official key layout, a seeded input
and targets, and what the official code computed: eval logits and boxes, post-processed
detections and the per-term training losses. Here the weights go through
:func:`distillery.students.official.convert_official_state_dict` into our student built with the
same reduced numbers, and everything must agree: outputs and losses within 1e-5, detections equal.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from distillery.students import WeightsError, build_criterion, build_student, criterion_options
from distillery.students.official import convert_official_state_dict, looks_official
from distillery.students.postprocess import postprocess

FIXTURES = Path(__file__).parent / "fixtures" / "parity"
CASES = sorted(p.stem for p in FIXTURES.glob("*.json"))
TOLERANCE = 1e-5

pytestmark = pytest.mark.filterwarnings("ignore:DEIMv2 backbone")


def load_case(case: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """(meta, tensors); weights another fixture holds (``shared_weights``: DEIMv2-N's HGNetv2-B0 is
    RT-DETRv4-S's) merged in, that file's sha256 checked."""
    meta = json.loads((FIXTURES / f"{case}.json").read_text())
    tensors = load_file(FIXTURES / f"{case}.safetensors")
    shared = meta.get("shared_weights")
    if shared is not None:
        source = FIXTURES / shared["file"]
        assert hashlib.sha256(source.read_bytes()).hexdigest() == shared["sha256"], (
            f"{source} changed since {case} was written: rerun tools/parity/write_fixtures.py for {case}")
        tensors.update({k: v for k, v in load_file(source).items() if k.startswith(f"weights/{shared['prefix']}")})
    tensors["images"] = tensors["images"].float()  # stored as float16 where its values allow (DEIMv2 L/X)
    return meta, tensors


def official_weights(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The fixture's state dict (float16-representable values stored as float16) as float32."""
    return {k[len("weights/"):]: (v.float() if v.is_floating_point() else v)
            for k, v in tensors.items() if k.startswith("weights/")}


def our_model(meta: dict, tensors: dict[str, torch.Tensor]) -> torch.nn.Module:
    model = build_student(meta["student"], **meta["student_overrides"])
    # DEIMv2 L/X: the ViT the weights go into (reduced here) describes the architecture to timm's converter.
    vit = getattr(model.backbone, "vit", None) if meta["student"] in ("deimv2_l", "deimv2_x") else None
    converted = convert_official_state_dict(meta["student"], official_weights(tensors), vit=vit)
    missing, unexpected = model.load_state_dict(converted, strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    return model


def targets_of(tensors: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    count = len({k.split("/")[1] for k in tensors if k.startswith("targets/")})
    return [{"labels": tensors[f"targets/{i}/labels"], "boxes": tensors[f"targets/{i}/boxes"]} for i in range(count)]


def test_fixtures_exist_and_record_the_official_commit():
    assert {"rtdetrv4_s_reduced", "deimv2_s_reduced", "deimv2_pico_reduced", "deimv2_n_reduced",
            "deimv2_l_reduced", "deimv2_x_reduced"} <= set(CASES)
    for case in CASES:
        meta, tensors = load_case(case)
        assert len(meta["official_commit"]) == 40 and meta["official_repo"] in (
            "RT-DETRs/RT-DETRv4", "Intellindust-AI-Lab/DEIMv2")
        assert looks_official(official_weights(tensors))
        if meta["student"] in ("deimv2_l", "deimv2_x"):
            # The DINOv3 ViT's trained query and value biases are non-zero; the key third is masked.
            biases = [v for k, v in official_weights(tensors).items() if k.endswith("attn.qkv.bias")]
            masks = [v for k, v in official_weights(tensors).items() if k.endswith("attn.qkv.bias_mask")]
            assert len(biases) == len(masks) == 12
            for bias, mask in zip(biases, masks):
                q, _, v = bias.chunk(3)
                assert bool(q.any()) and bool(v.any())
                assert mask.chunk(3)[1].eq(0).all() and mask.chunk(3)[0].eq(1).all() and mask.chunk(3)[2].eq(1).all()


@pytest.mark.parametrize("case", CASES)
def test_eval_outputs_and_detections_match_the_official_code(case):
    meta, tensors = load_case(case)
    model = our_model(meta, tensors).eval()
    with torch.no_grad():
        out = model(tensors["images"])
    torch.testing.assert_close(out["pred_logits"], tensors["pred_logits"], atol=TOLERANCE, rtol=0)
    torch.testing.assert_close(out["pred_boxes"], tensors["pred_boxes"], atol=TOLERANCE, rtol=0)

    # Post-processing of the official outputs: the same top-k (query, class) pairs, boxes, scores.
    official = {"pred_logits": tensors["pred_logits"], "pred_boxes": tensors["pred_boxes"]}
    ours = postprocess(official["pred_logits"], official["pred_boxes"], tensors["orig_sizes"],
                       num_top=meta["num_top_queries"])
    for i, det in enumerate(ours):
        assert torch.equal(det["labels"], tensors[f"detections/{i}/labels"])
        torch.testing.assert_close(det["boxes"], tensors[f"detections/{i}/boxes"], atol=0, rtol=0)
        torch.testing.assert_close(det["scores"], tensors[f"detections/{i}/scores"], atol=0, rtol=0)
    # And from our own outputs: the same (query, class) pairs in the same order.
    ours = postprocess(out["pred_logits"], out["pred_boxes"], tensors["orig_sizes"], num_top=meta["num_top_queries"])
    for i, det in enumerate(ours):
        assert torch.equal(det["labels"], tensors[f"detections/{i}/labels"])
        torch.testing.assert_close(det["boxes"], tensors[f"detections/{i}/boxes"], atol=1e-3, rtol=0)  # pixels


@pytest.mark.parametrize("case", CASES)
def test_training_losses_match_the_official_code(case):
    meta, tensors = load_case(case)
    model = our_model(meta, tensors).train()
    targets = targets_of(tensors)
    torch.manual_seed(meta["loss_seed"])  # the denoising queries draw as the official ones do
    out = model(tensors["images"], targets)
    # The size's official criterion as the jobs build it (the fixture's options are a part of it; its
    # losses were computed at epoch 0, before any matcher change).
    options = criterion_options(meta["student"])
    assert meta["criterion_overrides"].items() <= options.items()
    criterion = build_criterion(meta["student_overrides"]["num_classes"], **options)
    losses = criterion(out, targets)
    official = meta["losses"]
    assert sorted(losses) == sorted(official)
    worst = max(abs(float(losses[k]) - official[k]) for k in official)
    assert worst <= TOLERANCE, {k: (float(losses[k]), official[k]) for k in official
                                if abs(float(losses[k]) - official[k]) > TOLERANCE}


def test_converter_names_what_it_cannot_map():
    _, tensors = load_case("rtdetrv4_s_reduced")
    state = official_weights(tensors)
    state["encoder.encoder.0.layers.1.linear1.weight"] = torch.zeros(1)  # a second AIFI layer: not ours
    with pytest.raises(WeightsError, match=r"(?s)1 of \d+ official keys have no counterpart.*layers\.1\.linear1"):
        convert_official_state_dict("rtdetrv4_s", state)
    with pytest.raises(KeyError, match="not an RT-DETRv4"):
        convert_official_state_dict("yolo", state)


def test_dinov3_vit_layout_of_deimv2_l_converts_as_the_backbone_loader_does():
    """DEIMv2-L/X checkpoints hold Meta's DINOv3 layout under ``backbone.dinov3.``, with the query and
    value biases the official model trains (the key bias masked to zero)."""
    from distillery.students.deimv2 import DINOv3ViTBackbone

    torch.manual_seed(0)
    source = DINOv3ViTBackbone("vit_small_patch16_dinov3_qkvb", layers=(5, 8, 11), norm_outputs=True)
    with torch.no_grad():
        for name, p in source.vit.named_parameters():
            if name.endswith(("q_bias", "v_bias")):
                p.normal_()
    meta_layout = {"backbone.dinov3.mask_token": torch.zeros(1, 384),
                   "backbone.dinov3.rope_embed.periods": torch.ones(16)}
    state = source.vit.state_dict()
    for key, value in state.items():
        key = key.replace("reg_token", "storage_tokens").replace("gamma_1", "ls1.gamma").replace("gamma_2", "ls2.gamma")
        if key.endswith("attn.q_bias"):
            key, value = key.replace("q_bias", "qkv.bias"), torch.cat(
                [value, torch.zeros(384), state[key.replace("q_bias", "v_bias")]])
        elif key.endswith(("attn.v_bias", "attn.k_bias")):
            continue
        meta_layout[f"backbone.dinov3.{key}"] = value
    converted = convert_official_state_dict("deimv2_l", meta_layout)
    expected = {f"backbone.vit.{k}": v for k, v in state.items() if not k.endswith("k_bias")}
    assert sorted(converted) == sorted(expected)
    for key, value in expected.items():
        assert torch.equal(converted[key], value), key
    # A ViT without q/v biases (the plain timm variant) cannot drop trained ones.
    plain = DINOv3ViTBackbone("vit_small_patch16_dinov3", layers=(5, 8, 11), norm_outputs=True).vit
    with pytest.raises(WeightsError, match="non-zero query/value biases.*_qkvb"):
        convert_official_state_dict("deimv2_l", meta_layout, vit=plain)
