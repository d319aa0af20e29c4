"""Whole-student weights (distillery.students.weights via build_student(weights=...)): release
checkpoint layouts (ema vs model), Distillery checkpoints, safetensors, strict errors with a summary
line, class-dependent re-initialisation with its report, class_map rows, config-time refusal of hub
ids when offline."""

from __future__ import annotations

import copy
import functools
import math
import re
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import save_file

from distillery.students import WeightsError, build_student, load_student_weights
from distillery.students.weights import COCO_CLASS_NAMES, class_map_from_names, is_class_dependent

SMALL = dict(eval_spatial_size=64, num_queries=10, num_denoising=4, dsi=False)
LAYERS = 2  # rtdetrv4_tiny's decoder layers


@functools.lru_cache(maxsize=None)
def _template(num_classes: int, dsi: bool) -> dict[str, torch.Tensor]:
    overrides = {"dsi": True, "teacher_dim": 16} if dsi else {}
    return build_student("rtdetrv4_tiny", num_classes=num_classes, **{**SMALL, **overrides}).state_dict()


def _seeded_state(num_classes: int, seed: int, dsi: bool = False) -> dict[str, torch.Tensor]:
    """A tiny student's state dict with every float tensor randomised (so "loaded" is checkable)."""
    gen = torch.Generator().manual_seed(seed)
    return {k: (torch.randn(v.shape, generator=gen) if v.is_floating_point() else v.clone())
            for k, v in _template(num_classes, dsi).items()}


def _assert_loaded(model, state: dict[str, torch.Tensor], skip=lambda key: False) -> None:
    own = model.state_dict()
    for key, value in state.items():
        if not skip(key):
            assert torch.equal(own[key], value), key


def test_official_release_layout_prefers_ema_over_model(tmp_path):
    raw, ema = _seeded_state(6, 0), _seeded_state(6, 1)
    # What the official solvers save: model, ema {module, updates}, optimizer state, epoch counters.
    both = tmp_path / "release.pth"
    torch.save({"model": raw, "ema": {"module": {f"module.{k}": v for k, v in ema.items()}, "updates": 1234},
                "last_epoch": 71, "date": "2025-10-01"}, both)
    model = build_student("rtdetrv4_tiny", weights=both, num_classes=6, **SMALL)
    _assert_loaded(model, ema)
    assert model.weights_report.layout.endswith("ema")
    assert model.weights_report.loaded == len(ema) and not model.weights_report.reinitialised

    only_model = tmp_path / "model_only.pth"
    torch.save({"model": raw}, only_model)
    model = build_student("rtdetrv4_tiny", only_model, 6, **SMALL)
    _assert_loaded(model, raw)
    assert model.weights_report.layout.endswith("model")


def test_plain_state_dict_safetensors_and_distillery_checkpoint(tmp_path):
    state = _seeded_state(6, 2)
    save_file({f"_orig_mod.{k}": v.contiguous() for k, v in state.items()}, str(tmp_path / "w.safetensors"))
    model = build_student("rtdetrv4_tiny", weights=tmp_path / "w.safetensors", num_classes=6, **SMALL)
    _assert_loaded(model, state)
    assert model.weights_report.layout == "safetensors"

    # A Distillery training checkpoint: the EMA module, trained with a DSI projector.
    with_dsi = _seeded_state(6, 3, dsi=True)
    ckpt = tmp_path / "checkpoint_000003"
    ckpt.mkdir()
    torch.save({"ema": {"module": with_dsi, "updates": 9}, "gam": None, "epoch": 3, "global_step": 30},
               ckpt / "distillery_state.pt")
    inference = build_student("rtdetrv4_tiny", weights=ckpt, num_classes=6, **SMALL)  # no DSI: dropped
    _assert_loaded(inference, with_dsi, skip=lambda k: k.startswith("dsi."))
    assert inference.weights_report.layout == "distillery-checkpoint"
    assert inference.weights_report.dropped == ["dsi.bias", "dsi.weight"]
    # An official release has no projector: a student trained with DSI keeps its fresh one.
    torch.save(state, tmp_path / "plain.pth")
    student = build_student("rtdetrv4_tiny", weights=tmp_path / "plain.pth", num_classes=6,
                            **{**SMALL, "dsi": True, "teacher_dim": 16})
    assert student.weights_report.kept_init == ["dsi.bias", "dsi.weight"]


def test_strict_errors_start_with_a_summary_line(tmp_path):
    state = _seeded_state(6, 4)
    keys = sorted(k for k in state if not is_class_dependent(k))
    for key in keys[:3]:
        del state[key]
    state["decoder.extra.weight"] = torch.zeros(2)
    state["neck.unknown"] = torch.zeros(1)
    state[keys[-1]] = torch.zeros(3, 3)
    path = tmp_path / "broken.pth"
    torch.save(state, path)
    with pytest.raises(WeightsError) as err:
        build_student("rtdetrv4_tiny", weights=path, num_classes=6, **SMALL)
    lines = str(err.value).splitlines()
    assert lines[0] == f"3 missing, 2 unexpected, 1 mis-shaped keys in {path} for rtdetrv4_tiny"
    assert keys[0] in lines[1] and "neck.unknown" in lines[2] and f"{keys[-1]} (file (3, 3)" in lines[3]

    torch.save({"epoch": 3}, tmp_path / "no_weights.pth")
    with pytest.raises(WeightsError, match="no_weights.pth holds no state dict"):
        build_student("rtdetrv4_tiny", weights=tmp_path / "no_weights.pth", **SMALL)
    (tmp_path / "truncated.pth").write_bytes(path.read_bytes()[:100])
    with pytest.raises(WeightsError, match="could not read weights file .*truncated.pth"):
        build_student("rtdetrv4_tiny", weights=tmp_path / "truncated.pth", **SMALL)
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        build_student("rtdetrv4_tiny", weights=tmp_path / "nowhere.pth", **SMALL)


def test_other_class_count_reinitialises_only_class_tensors(tmp_path):
    state = _seeded_state(6, 5)
    torch.save({"model": state}, tmp_path / "six.pth")
    model = build_student("rtdetrv4_tiny", weights=tmp_path / "six.pth", num_classes=3, **SMALL)
    report = model.weights_report
    # Encoder score head (weight, bias), one class head per decoder layer (layer 0's is also the
    # pre-head), the denoising label embedding.
    expected = {"decoder.enc_score_head.weight", "decoder.enc_score_head.bias", "decoder.denoising_class_embed.weight",
                *(f"decoder.dec_score_head.{i}.{p}" for i in range(LAYERS) for p in ("weight", "bias"))}
    assert set(report.reinitialised) == expected and len(report.reinitialised) == 2 + 2 * LAYERS + 1
    assert (report.checkpoint_num_classes, report.model_num_classes) == (6, 3)
    assert report.loaded == len(state) - len(expected)
    _assert_loaded(model, state, skip=is_class_dependent)
    own = model.state_dict()
    prior = -math.log((1 - 0.01) / 0.01)
    assert torch.allclose(own["decoder.enc_score_head.bias"], torch.full((3,), prior))
    assert torch.allclose(own["decoder.dec_score_head.1.bias"], torch.full((3,), prior))
    assert own["decoder.denoising_class_embed.weight"].shape == (4, 64)
    assert torch.count_nonzero(own["decoder.denoising_class_embed.weight"][-1]) == 0  # padding row
    assert "re-initialised" in report.summary()


def test_class_map_keeps_the_mapped_rows(tmp_path):
    state = _seeded_state(6, 6)
    torch.save(state, tmp_path / "six.pth")
    model = build_student("rtdetrv4_tiny", weights=tmp_path / "six.pth", num_classes=3,
                          class_map={0: 4, 2: 1}, **SMALL)
    own = model.state_dict()
    for key in ("decoder.enc_score_head.weight", "decoder.dec_score_head.0.bias",
                "decoder.denoising_class_embed.weight"):
        assert torch.equal(own[key][0], state[key][4]) and torch.equal(own[key][2], state[key][1])
        assert not torch.equal(own[key][1], state[key][1])  # unmapped: fresh
    assert model.weights_report.class_rows_copied == {0: 4, 2: 1}
    with pytest.raises(WeightsError, match="class_map entries out of range"):
        build_student("rtdetrv4_tiny", weights=tmp_path / "six.pth", num_classes=3, class_map={0: 6}, **SMALL)

    names = ["Dog", "traffic_light", "unicorn"]
    assert class_map_from_names(names) == {0: COCO_CLASS_NAMES.index("dog"), 1: 9}


def test_hub_ids_fail_at_config_time_when_offline(monkeypatch):
    from distillery.platform.config.distill import DistillConfig

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for section in ({"student": {"backbone_weights": "hf-hub:timm/hgnetv2_b0.ssld_stage2_ft_in1k"}},
                    {"teacher": {"weights": "https://example.com/dinov3_vitb16.pth", "input_size": 256}},
                    {"student": {"weights": "hf-hub:someone/rtdetrv4-s"}}):
        with pytest.raises(ValidationError, match="(?i)offline.*download the file.*pass its path"):
            DistillConfig.model_validate(section)
    cfg = DistillConfig.model_validate({"student": {"weights": "/data/rtv4_s.pth", "class_map": "coco"}})
    assert cfg.student.weights == "/data/rtv4_s.pth"


def test_job_settings_become_build_student_arguments(tmp_path):
    from distillery.platform.config.distill import StudentSettings
    from distillery.platform.io.weights_source import student_weight_kwargs

    path = tmp_path / "release.pth"
    path.write_bytes(b"not read here")
    names = ["dog", "widget", "Person"]
    coco = student_weight_kwargs(StudentSettings(weights=str(path), class_map="coco"), names)
    assert coco == {"weights": str(path), "class_map": {0: COCO_CLASS_NAMES.index("dog"), 2: 0}}
    by_name = student_weight_kwargs(StudentSettings(weights=str(path), class_map={"widget": 41}), names)
    assert by_name["class_map"] == {1: 41}
    with pytest.raises(ValueError, match="gizmo"):
        student_weight_kwargs(StudentSettings(weights=str(path), class_map={"gizmo": 1}), names)
    with pytest.raises(ValidationError, match="class_map needs student.weights"):
        StudentSettings(class_map="coco")


def test_https_sources_are_downloaded_once_with_their_sha256(tmp_path):
    import hashlib
    import http.server
    import threading

    from distillery.platform.io.weights_source import resolve_weights_source

    served = tmp_path / "served"
    served.mkdir()
    (served / "backbone.pth").write_bytes(b"weights" * 1000)
    handler = lambda *a, **k: http.server.SimpleHTTPRequestHandler(*a, directory=str(served), **k)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/backbone.pth"
    try:
        path, sha = resolve_weights_source(url, cache_dir=tmp_path / "cache")
    finally:
        server.shutdown()
        server.server_close()
    assert sha == hashlib.sha256(b"weights" * 1000).hexdigest() and Path(path).read_bytes() == b"weights" * 1000
    assert resolve_weights_source(url, cache_dir=tmp_path / "cache") == (path, sha)  # server gone: the cache


def _renamed(state: dict[str, torch.Tensor], rules) -> dict[str, torch.Tensor]:
    """``state`` with each key through the first of ``rules`` (regex, replacement) that matches it."""
    out = {}
    for key, value in state.items():
        for pattern, replacement in rules:
            key, hit = re.subn(pattern, replacement, key)
            if hit:
                break
        out[key] = value
    return out


def _official_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our tiny RT-DETRv4's state dict under the official repository's key names (the reverse of
    distillery.students.official's renaming), with the buffers the official model also saves."""
    rules = ((r"^backbone\.body\.stem\.", "backbone.stem."),
             (r"^backbone\.body\.stages_(\d+)\.", r"backbone.stages.\1."),
             (r"^encoder\.aifi\.", "encoder.encoder.0.layers.0."),
             (r"^encoder\.downsample_convs\.(\d+)\.", r"encoder.downsample_convs.\1.0."),
             (r"^decoder\.(layers|lqe_layers)\.", r"decoder.decoder.\1."), (r"^dsi\.", "encoder.feature_projector.0."))
    out = _renamed(state, rules)
    out.update({"decoder.anchors": torch.zeros(1, 84, 4), "decoder.valid_mask": torch.ones(1, 84, 1, dtype=torch.bool),
                "decoder.decoder.up": torch.tensor([0.5]), "decoder.decoder.reg_scale": torch.tensor([4.0]),
                "decoder.decoder.layers.0.cross_attn.num_points_scale": torch.ones(12)})
    return out


def test_official_key_layout_is_translated(tmp_path):
    ema = _seeded_state(80, 7, dsi=True)
    path = tmp_path / "rtv4_tiny_coco.pth"
    torch.save({"model": _official_names(_seeded_state(80, 8, dsi=True)),
                "ema": {"module": _official_names(ema), "updates": 10}}, path)
    model = build_student("rtdetrv4_tiny", weights=path, **{**SMALL, "dsi": True, "teacher_dim": 16})
    _assert_loaded(model, ema)
    assert model.weights_report.layout == "official-ema"
    fewer = build_student("rtdetrv4_tiny", weights=path, num_classes=2, class_map={0: 0, 1: 2}, **SMALL)
    assert fewer.weights_report.dropped == ["dsi.bias", "dsi.weight"] and len(fewer.weights_report.reinitialised) == 7


# DEIMv2 L/X reduced: the real timm DINOv3 ViT-S / S+ (3 of its blocks), small STA, encoder, decoder.
REDUCED_VIT = dict(num_classes=3, eval_spatial_size=64, vit_layers=(0, 1, 2), sta_channels=8, sta_dim=64,
                   encoder_hidden_dim=64, encoder_ffn_dim=128, expansion=0.34, depth_mult=0.34, decoder_hidden_dim=64,
                   decoder_ffn_dim=128, num_decoder_layers=2, num_queries=10, num_denoising=4)


def _official_deimv2_vit_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A DEIMv2 ViT-size state dict of ours under the official DEIMv2 names (the reverse of
    distillery.students.official): Meta's DINOv3 layout under ``backbone.dinov3.`` (fused ``qkv.bias``
    with its k-bias mask, storage tokens, ``ls1/ls2.gamma``, RoPE periods, one more block than ours
    uses), the STA under ``backbone.``, RMSNorm ``scale`` and ``swish_ffn`` in the decoder."""
    rules = ((r"^backbone\.vit\.", "backbone.dinov3."),
             (r"^sta\.detail\.stem\.", "backbone.sta.stem."), (r"^sta\.detail\.down8\.", "backbone.sta.conv2."),
             (r"^sta\.detail\.down16\.", "backbone.sta.conv3."), (r"^sta\.detail\.down32\.", "backbone.sta.conv4."),
             (r"^sta\.fuse\.(\d+)\.0\.", r"backbone.convs.\1."), (r"^sta\.fuse\.(\d+)\.1\.", r"backbone.norms.\1."),
             (r"^encoder\.aifi\.", "encoder.encoder.0.layers.0."),
             (r"^encoder\.downsample_convs\.(\d+)\.", r"encoder.downsample_convs.\1.0."),
             (r"^decoder\.(layers|lqe_layers)\.", r"decoder.decoder.\1."))
    out = {}
    for key, value in _renamed(state, rules).items():
        key = key.replace(".swiglu.", ".swish_ffn.").replace("reg_token", "storage_tokens")
        key = key.replace("gamma_1", "ls1.gamma").replace("gamma_2", "ls2.gamma")
        if re.match(r"^decoder\.decoder\.layers\.\d+\.(norm\d|gateway\.norm)\.weight$", key):
            key = key[:-len("weight")] + "scale"
        out[key] = value
    for key in [k for k in out if k.endswith("attn.q_bias")]:
        q, v = out.pop(key), out.pop(key.replace("q_bias", "v_bias"))
        out[key.replace("q_bias", "qkv.bias")] = torch.cat([q, torch.randn_like(q), v])  # k bias: masked out
        out[key.replace("q_bias", "qkv.bias_mask")] = torch.cat([torch.ones_like(q), torch.zeros_like(q),
                                                                 torch.ones_like(v)])
    for key in [k for k in out if k.startswith("backbone.dinov3.blocks.2.")]:  # a block the model prunes
        out[key.replace("blocks.2.", "blocks.3.")] = out[key].clone()
    width = out["backbone.dinov3.cls_token"].shape[-1]
    out.update({"backbone.dinov3.mask_token": torch.zeros(1, width), "backbone.dinov3.rope_embed.periods": torch.ones(16),
                "decoder.anchors": torch.zeros(1, 20, 4), "decoder.valid_mask": torch.ones(1, 20, 1, dtype=torch.bool),
                "decoder.decoder.up": torch.tensor([0.5]), "decoder.decoder.reg_scale": torch.tensor([4.0])})
    return out


@pytest.mark.filterwarnings("ignore:DEIMv2 backbone")
@pytest.mark.parametrize("name", ["deimv2_l", "deimv2_x"])
def test_deimv2_l_x_release_checkpoints_with_trained_qv_biases_load(tmp_path, name):
    """The official L/X train the DINOv3 ViT's query and value biases (k masked): a release file with
    non-zero ones loads, the biases are the file's, and they change the outputs."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(11)
    source = build_student(name, **REDUCED_VIT).state_dict()
    state = {k: (0.02 * torch.randn(v.shape, generator=gen) + (1.0 if k.endswith((".weight", "gamma_1", "gamma_2",
                                                                                 "running_var")) and v.dim() == 1
                                                              else 0.0))
             if v.is_floating_point() else v.clone() for k, v in source.items()}
    assert any(k.endswith("attn.q_bias") for k in state)  # the registered L/X backbones have q/v biases
    official = _official_deimv2_vit_names(state)
    path = tmp_path / f"{name}_coco.pth"
    torch.save({"model": official, "ema": {"module": {f"module.{k}": v for k, v in official.items()}, "updates": 3},
                "last_epoch": 67}, path)
    model = build_student(name, weights=path, **REDUCED_VIT).eval()
    assert model.weights_report.layout == "official-ema"
    own = model.state_dict()
    for block in range(3):
        bias = official[f"backbone.dinov3.blocks.{block}.attn.qkv.bias"]
        assert torch.equal(own[f"backbone.vit.blocks.{block}.attn.q_bias"], bias.chunk(3)[0])
        assert torch.equal(own[f"backbone.vit.blocks.{block}.attn.v_bias"], bias.chunk(3)[2])
    _assert_loaded(model, state, skip=lambda k: k.endswith(("q_bias", "v_bias")))

    unbiased = {k: (torch.zeros_like(v) if k.endswith("attn.qkv.bias") else v) for k, v in official.items()}
    torch.save({"ema": {"module": unbiased}}, tmp_path / "zero_qv.pth")
    zero = copy.deepcopy(model)
    load_student_weights(zero, tmp_path / "zero_qv.pth", name)
    images = torch.rand(2, 3, 64, 64, generator=gen)
    with torch.no_grad():
        out, out_zero = model(images), zero(images)
    assert (out["pred_logits"] - out_zero["pred_logits"]).abs().max() > 1e-4

    # The variant without q/v biases cannot drop trained ones: the first line names the file and the fix.
    plain = "vit_small_plus_patch16_dinov3" if name == "deimv2_x" else "vit_small_patch16_dinov3"
    with pytest.raises(WeightsError) as err:
        build_student(name, weights=path, backbone=plain, **REDUCED_VIT)
    first = str(err.value).splitlines()[0]
    assert str(path) in first and "non-zero query/value biases" in first and "_qkvb" in first, first
