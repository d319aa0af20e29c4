"""Bad teacher weights files, table-driven: the FIRST line of each error names the file and the problem.

Each case writes one file (tiny DINOv3s: the same timm code, 64 wide, 2 blocks; real widths with
2 blocks where the width is the point) and loads it into a teacher. Loading writes nothing, so
"nothing lost" is trivially true here; what matters is that the first line is enough to act on.
"""

from __future__ import annotations

import argparse
import logging
import re
import warnings
from pathlib import Path

import pytest
import timm
import torch

from distillery.teachers import DinoV3Teacher, TeacherWeightsError
from test_teacher import SIZE, TINY, images, randomise_, reference_grid, to_meta_layout, with_periods

B16 = "vit_base_patch16_dinov3"


def source_model(name: str = B16, seed: int = 21, **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=0, **{**TINY, **overrides}).eval()
    randomise_(model, seed=seed)
    return model


def load(path: Path, name: str = B16, **overrides) -> DinoV3Teacher:
    return DinoV3Teacher(model_name=name, weights=path, input_size=SIZE, model_kwargs={**TINY, **overrides})


# --------------------------------------------------------------------------- the files

def absent(tmp: Path) -> Path:
    return tmp / "absent.pth"


def directory(tmp: Path) -> Path:
    (tmp / "weights.pth").mkdir()
    return tmp / "weights.pth"


def empty(tmp: Path) -> Path:
    (tmp / "empty.pth").write_bytes(b"")
    return tmp / "empty.pth"


def text_named_pth(tmp: Path) -> Path:
    (tmp / "readme.pth").write_text("<html>404 Not Found</html>\n")
    return tmp / "readme.pth"


def truncated(tmp: Path) -> Path:
    full = tmp / "full.pth"
    torch.save(source_model().state_dict(), full)
    data = full.read_bytes()
    (tmp / "truncated.pth").write_bytes(data[: len(data) // 2])
    return tmp / "truncated.pth"


def pickled_object(tmp: Path) -> Path:
    torch.save({"weights": {"a": torch.zeros(1)}, "args": argparse.Namespace(lr=0.1)}, tmp / "pickled.pth")
    return tmp / "pickled.pth"


def not_a_dict(tmp: Path) -> Path:
    torch.save([torch.zeros(1)], tmp / "list.pth")
    return tmp / "list.pth"


def not_tensors(tmp: Path) -> Path:
    torch.save({"cls_token": torch.zeros(1), "epoch": 3}, tmp / "mixed.pth")
    return tmp / "mixed.pth"


def garbage_safetensors(tmp: Path) -> Path:
    (tmp / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\": broken json}")
    return tmp / "model.safetensors"


def _meta(tmp: Path, name: str, edit, model: str = B16, **overrides) -> Path:
    sd = to_meta_layout(source_model(model, **overrides))
    edit(sd)
    torch.save(sd, tmp / name)
    return tmp / name


def patch14_meta(tmp: Path) -> Path:
    """A patch-14 kernel (DINOv2's): timm's converter would resample it to 16x16 without a word."""
    return _meta(tmp, "patch14.pth", lambda sd: sd.update({"patch_embed.proj.weight": torch.randn(64, 3, 14, 14)}))


def patch14_timm(tmp: Path) -> Path:
    sd = source_model().state_dict()
    sd["patch_embed.proj.weight"] = torch.randn(64, 3, 14, 14)
    torch.save(sd, tmp / "patch14-timm.pth")
    return tmp / "patch14-timm.pth"


def other_rope_key(tmp: Path) -> Path:
    return _meta(tmp, "rope.pth", lambda sd: sd.update({"rope_embed.coords_h": torch.arange(4.0)}))


def wrong_length_qkv_bias(tmp: Path) -> Path:
    return _meta(tmp, "qkv-bias.pth", lambda sd: sd.update({"blocks.0.attn.qkv.bias": torch.zeros(100)}))


def wrong_length_bias_mask(tmp: Path) -> Path:
    return _meta(tmp, "qkv-mask.pth", lambda sd: sd.update({"blocks.1.attn.qkv.bias_mask": torch.ones(10)}))


def nan_bias_mask(tmp: Path) -> Path:
    return _meta(tmp, "nan-mask.pth",
                 lambda sd: sd.update({"blocks.0.attn.qkv.bias_mask": torch.full((192,), float("nan"))}))


def k_bias_kept_plain_model(tmp: Path) -> Path:
    """A mask that keeps the (random) k bias, for a model that has no qkv bias at all."""
    return _meta(tmp, "k-kept.pth", lambda sd: sd.update({"blocks.0.attn.qkv.bias_mask": torch.ones(192)}))


def qv_bias_small_model(tmp: Path) -> Path:
    return _meta(tmp, "small-qkvb.pth", lambda sd: None, model="vit_small_patch16_dinov3_qkvb")


def vit_s_for_vit_b(tmp: Path) -> Path:
    """A ViT-S/16 file (embed dim 384) given to the ViT-B/16 teacher: every block mis-shaped."""
    sd = to_meta_layout(source_model("vit_small_patch16_dinov3", embed_dim=384, num_heads=6))
    torch.save(sd, tmp / "dinov3_vits16.pth")
    return tmp / "dinov3_vits16.pth"


def missing_and_unexpected(tmp: Path) -> Path:
    def edit(sd):
        del sd["blocks.1.ls2.gamma"], sd["norm.bias"]
        sd["head.weight"] = torch.zeros(10, 64)
    return _meta(tmp, "keys.pth", edit)


# (case, file maker, teacher, exception, regex for the first line after the file name)
CASES = [
    ("absent", absent, {}, FileNotFoundError, r"not found"),
    ("directory", directory, {}, TeacherWeightsError, r"is a directory, not a file"),
    ("empty", empty, {}, TeacherWeightsError, r"is empty \(0 bytes\)"),
    ("text named .pth", text_named_pth, {}, TeacherWeightsError, r"is not a PyTorch checkpoint or safetensors"),
    ("truncated", truncated, {}, TeacherWeightsError, r"truncated or corrupt"),
    ("pickled objects", pickled_object, {}, TeacherWeightsError, r"Python objects .* refused by weights_only"),
    ("a list", not_a_dict, {}, TeacherWeightsError, r"holds a list, not a state dict"),
    ("non-tensor entries", not_tensors, {}, TeacherWeightsError, r"entries that are not tensors: \['epoch'\]"),
    ("garbage safetensors", garbage_safetensors, {}, TeacherWeightsError, r"not a readable safetensors file"),
    ("14x14 kernel, Meta", patch14_meta, {}, TeacherWeightsError,
     r"0 missing, 0 unexpected, 1 mis-shaped keys; this looks like .*/14"),
    ("14x14 kernel, timm", patch14_timm, {}, TeacherWeightsError, r"1 mis-shaped keys; this looks like .*/14"),
    ("other RoPE key", other_rope_key, {}, TeacherWeightsError, r"RoPE keys \['rope_embed.coords_h'\]"),
    ("qkv.bias length", wrong_length_qkv_bias, {}, TeacherWeightsError, r"0 unexpected, 1 mis-shaped keys"),
    ("bias_mask length", wrong_length_bias_mask, {}, TeacherWeightsError, r"1 mis-shaped keys"),
    ("NaN bias_mask", nan_bias_mask, {}, TeacherWeightsError, r"bias_mask has non-finite values"),
    ("k bias kept, no qkv bias", k_bias_kept_plain_model, {}, TeacherWeightsError,
     r"blocks.0.attn.qkv.bias .* non-zero .* use vit_base_patch16_dinov3_qkvb"),
    ("qkvb hint names the model", qv_bias_small_model, {"name": "vit_small_patch16_dinov3"}, TeacherWeightsError,
     r"has no qkv bias; use vit_small_patch16_dinov3_qkvb"),
    ("ViT-S file, ViT-B teacher", vit_s_for_vit_b, {"embed_dim": 768, "num_heads": 12}, TeacherWeightsError,
     r"mis-shaped keys; this looks like ViT-S/16 \(embed dim 384, patch 16, 2 blocks\)"),
    ("missing and unexpected", missing_and_unexpected, {}, TeacherWeightsError,
     r"2 missing, 1 unexpected, 0 mis-shaped keys$"),
]


@pytest.mark.parametrize("case,make,teacher,exc_type,first_line", CASES, ids=[c[0] for c in CASES])
def test_first_line_names_file_and_problem(tmp_path, case, make, teacher, exc_type, first_line):
    path = make(tmp_path)
    with pytest.raises(exc_type) as err:
        load(path, **teacher)
    first = str(err.value).splitlines()[0]
    assert str(path) in first, first
    assert re.search(first_line, first), first
    assert "weights_only=False" not in str(err.value)  # never advise running a file's pickled code


def test_bad_weights_files_are_deterministic_one_line_errors(tmp_path, capsys):
    """A bad teacher or student weights file fails the same way on every retry: Ray Train must
    not retry it, and the command line prints one ``error:`` line naming the file."""
    from distillery.platform.errors import exit_on_user_error, find_deterministic_error
    from distillery.students import build_student

    (tmp_path / "s").mkdir()
    teacher_file, student_file = empty(tmp_path), text_named_pth(tmp_path / "s")
    for path, attempt in ((teacher_file, lambda: load(teacher_file)),
                          (student_file, lambda: build_student("rtdetrv4_tiny", weights=student_file))):
        with pytest.raises(Exception) as err:
            attempt()
        assert find_deterministic_error(err.value) is err.value
        with pytest.raises(SystemExit) as exited:
            exit_on_user_error(attempt)
        assert exited.value.code == 2
        first = capsys.readouterr().err.splitlines()[0]
        assert first.startswith("error: ") and str(path) in first, first


def test_long_key_lists_are_cut_after_the_summary(tmp_path):
    path = vit_s_for_vit_b(tmp_path)
    with pytest.raises(TeacherWeightsError) as err:
        load(path, embed_dim=768, num_heads=12)
    lines = str(err.value).splitlines()
    assert len(lines) == 2 and "shape mismatch:" in lines[1] and "more)" in lines[1]
    assert "blocks.0.attn.proj.bias: file (384,) vs model (768,)" in lines[1]
    assert len(str(err.value)) < 1200


def test_patch14_kernel_is_never_resampled(tmp_path):
    path = patch14_meta(tmp_path)
    with pytest.raises(TeacherWeightsError, match=r"patch_embed.proj.weight: file \(64, 3, 14, 14\) vs model "
                                                  r"\(64, 3, 16, 16\)"):
        load(path)


def test_local_cls_norm_is_named_and_not_loaded(tmp_path, caplog):
    """Meta applies it only in training, to the CLS/storage tokens of local crops: not a teacher part."""
    path = _meta(tmp_path, "7b-style.pth", lambda sd: sd.update({"local_cls_norm.weight": torch.ones(64),
                                                                  "local_cls_norm.bias": torch.zeros(64)}))
    with caplog.at_level(logging.WARNING):
        teacher = load(path)
    assert "local_cls_norm.weight" in caplog.text and str(path) in caplog.text
    assert teacher.fingerprint["rope_periods"] == "checkpoint"


def test_kept_k_bias_is_loaded_as_meta_computes_it(tmp_path):
    """Meta's LinearKMaskedBias adds ``qkv.bias * bias_mask``; with ones on k the k bias is part of it.

    RoPE rotates each key *after* the bias is added, so the k bias does not cancel in the softmax:
    the output differs from the k-masked one, and equals a timm model whose k_bias holds it.
    """
    source = source_model("vit_base_patch16_dinov3_qkvb")
    meta = to_meta_layout(source, k_bias_seed=5)
    masked_path = tmp_path / "k-masked.pth"
    torch.save(meta, masked_path)
    for i in range(len(source.blocks)):
        meta[f"blocks.{i}.attn.qkv.bias_mask"] = torch.ones(192)
    kept_path = tmp_path / "k-kept.pth"
    torch.save(meta, kept_path)

    reference = with_periods(source, meta["rope_embed.periods"])
    with torch.no_grad():
        for i, block in enumerate(reference.blocks):
            block.attn.k_bias.copy_(meta[f"blocks.{i}.attn.qkv.bias"].chunk(3)[1])
    x = images(2, seed=7)
    kept = load(kept_path, "vit_base_patch16_dinov3_qkvb")(x)
    torch.testing.assert_close(kept, reference_grid(reference, x, pool=2, n_prefix=5), rtol=0, atol=0)
    masked = load(masked_path, "vit_base_patch16_dinov3_qkvb")(x)
    assert (kept - masked).abs().max() > 1e-3  # the k bias is not cancelled


# --------------------------------------------------------------------------- student weights files
# (tests/test_weights.py covers the key summary, a truncated file, no state dict and a missing file;
# these are the file-kind cases, which share the teacher's reader: distillery.torch_files)

def load_student(path: Path):
    from distillery.students import build_student

    return build_student("rtdetrv4_tiny", weights=path, num_classes=6, eval_spatial_size=64, num_queries=10,
                         num_denoising=4, dsi=False)


STUDENT_CASES = [
    ("empty", empty, r"is empty \(0 bytes\)"),
    ("text named .pth", text_named_pth, r"is not a PyTorch checkpoint or safetensors"),
    ("pickled objects", pickled_object, r"Python objects .* refused by weights_only"),
    ("directory without a checkpoint", directory, r"holds neither a Distillery checkpoint"),
]


@pytest.mark.parametrize("case,make,first_line", STUDENT_CASES, ids=[c[0] for c in STUDENT_CASES])
def test_student_weights_first_line_names_file_and_problem(tmp_path, case, make, first_line):
    from distillery.students import WeightsError

    path = make(tmp_path)
    with pytest.raises((WeightsError, FileNotFoundError)) as err:
        load_student(path)
    first = str(err.value).splitlines()[0]
    assert str(path) in first and re.search(first_line, first), first
    assert "weights_only=False" not in str(err.value)


# --------------------------------------------------------------------------- wrong-family student files
# Each loader (the official key converter, the strict whole-student check, the backbone loaders)
# raises WeightsError, which the jobs print as one `error:` line; when the file is recognisably
# another family, size or backbone, the first line says what it is and what the student expects.

PARITY = Path(__file__).parent / "fixtures" / "parity"
RTDETRV4_S_SMALL = dict(encoder_hidden_dim=64, encoder_ffn_dim=128, encoder_heads=4, decoder_hidden_dim=64,
                        decoder_ffn_dim=128, decoder_heads=4, num_decoder_layers=2, num_queries=30, num_denoising=20,
                        num_classes=80, eval_spatial_size=128, dsi=False)
DEIMV2_S_SMALL = dict(vit_dim=64, vit_heads=2, sta_channels=8, encoder_hidden_dim=64, encoder_ffn_dim=128,
                      decoder_hidden_dim=64, decoder_ffn_dim=128, num_decoder_layers=2, num_queries=30,
                      num_denoising=20, num_classes=80, eval_spatial_size=128)
PICO_SMALL = dict(encoder_hidden_dim=64, decoder_hidden_dim=64, decoder_ffn_dim=128, num_queries=30,
                  num_denoising=20, num_classes=80, eval_spatial_size=128)


def _release_from_fixture(tmp: Path, case: str) -> Path:
    """A parity fixture's official state dict (written by the official code) as the official solver
    saves a release: ``{"model": ..., "ema": {"module": ...}}``."""
    from safetensors.torch import load_file

    weights = {k[len("weights/"):]: v.float() if v.is_floating_point() else v
               for k, v in load_file(PARITY / f"{case}.safetensors").items() if k.startswith("weights/")}
    path = tmp / f"{case}.pth"
    torch.save({"model": weights, "ema": {"module": weights, "updates": 1}}, path)
    return path


def deimv2_s_release(tmp: Path) -> Path:
    return _release_from_fixture(tmp, "deimv2_s_reduced")


def rtdetrv4_s_release(tmp: Path) -> Path:
    return _release_from_fixture(tmp, "rtdetrv4_s_reduced")


def deimv2_s_full_size_ours(tmp: Path) -> Path:
    """A full-size DEIMv2-S in our layout (a Distillery export): shapes from a meta-device build."""
    from distillery.students import build_student

    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        shapes = {k: (v.shape, v.dtype) for k, v in build_student("deimv2_s").state_dict().items()}
    torch.save({k: torch.zeros(shape, dtype=dtype) for k, (shape, dtype) in shapes.items()}, tmp / "deimv2_s.pth")
    return tmp / "deimv2_s.pth"


def vit_file_as_hgnet_backbone(tmp: Path) -> Path:
    torch.save(source_model("vit_small_patch16_dinov3").state_dict(), tmp / "vit.pth")
    return tmp / "vit.pth"


# (case, file maker, student, build_student overrides, regex for the first line)
FAMILY_CASES = [
    ("DEIMv2-S release, rtdetrv4_s", deimv2_s_release, "rtdetrv4_s", RTDETRV4_S_SMALL,
     r"does not fit rtdetrv4_s: this is a DEIMv2 checkpoint \(64-wide distilled DINOv3 ViT backbone\); "
     r"rtdetrv4_s expects an HGNetv2-B0 one$"),
    ("DEIMv2-S release, deimv2_pico", deimv2_s_release, "deimv2_pico", PICO_SMALL,
     r"this is a DEIMv2 checkpoint \(64-wide distilled DINOv3 ViT backbone\); deimv2_pico expects a pruned "
     r"HGNetv2 \(Pico\) one$"),
    ("RT-DETRv4-S release, deimv2_s", rtdetrv4_s_release, "deimv2_s", DEIMV2_S_SMALL,
     # (the reduced fixture has rtdetrv4_tiny's backbone and decoder numbers, so it is named as one)
     r"this is an RT-DETRv4-Tiny checkpoint \(HGNetv2-B0 backbone\); deimv2_s expects a distilled DINOv3 ViT-Tiny "
     r"one$"),
    ("full-size DEIMv2-S, ours, rtdetrv4_s", deimv2_s_full_size_ours, "rtdetrv4_s", RTDETRV4_S_SMALL,
     r"this is a DEIMv2-S checkpoint \(distilled DINOv3 ViT-Tiny backbone\); rtdetrv4_s expects an HGNetv2-B0 one$"),
    ("ViT file as HGNetv2 backbone_weights", vit_file_as_hgnet_backbone, "rtdetrv4_s",
     {**RTDETRV4_S_SMALL, "weights_kwarg": "backbone_weights"}, r"backbone weights .* do not fit hgnetv2_b0"),
    ("truncated backbone_weights", truncated, "rtdetrv4_s", {**RTDETRV4_S_SMALL, "weights_kwarg": "backbone_weights"},
     r"could not read backbone weights file .* \(truncated or corrupt\?\)"),
    ("empty ViT backbone_weights", empty, "deimv2_s", {**DEIMV2_S_SMALL, "weights_kwarg": "backbone_weights"},
     r"backbone weights file .* is empty \(0 bytes\)"),
]


@pytest.mark.filterwarnings("ignore:DEIMv2 backbone")
@pytest.mark.parametrize("case,make,student,overrides,first_line", FAMILY_CASES, ids=[c[0] for c in FAMILY_CASES])
def test_wrong_family_files_say_what_they_are(tmp_path, capsys, case, make, student, overrides, first_line):
    from distillery.platform.errors import exit_on_user_error, find_deterministic_error
    from distillery.platform.io.weights_source import weights_file_errors
    from distillery.students import WeightsError, build_student

    path = make(tmp_path)
    overrides = dict(overrides)
    kwarg = overrides.pop("weights_kwarg", "weights")

    def attempt():
        with weights_file_errors():  # what the jobs wrap build_student in
            return build_student(student, **{kwarg: path}, **overrides)

    with pytest.raises(WeightsError) as err:
        build_student(student, **{kwarg: path}, **overrides)
    first = str(err.value).splitlines()[0]
    assert str(path) in first and re.search(first_line, first), first
    assert "weights_only=False" not in str(err.value)
    with pytest.raises(SystemExit) as exited:
        exit_on_user_error(attempt)
    assert exited.value.code == 2
    printed = capsys.readouterr().err.splitlines()
    assert printed[0].startswith("error: ") and str(path) in printed[0], printed
    with pytest.raises(Exception) as again:
        attempt()
    assert find_deterministic_error(again.value) is again.value
