"""The compressed cache codec (``cache.dtype: pca``): code packing, exact streamed moments, a
deterministic basis, the round trip on real teacher features, the file and its checks."""

import hashlib

import numpy as np
import pytest
import torch

from distillery.platform.cache.codec import (CodecFileError, PcaCodec, TokenMoments, fit_codec, load_verified_codec,
                                             pack_codes, quantize_per_token, tokens_of, unpack_codes)
from distillery.platform.cache.codec import quantize_int8

TINY_TEACHER = {"embed_dim": 32, "depth": 1, "num_heads": 2}  # configs/distill_tiny.yaml's


@pytest.mark.parametrize("bits,dims", [(4, 7), (4, 8), (8, 5)])
def test_codes_pack_and_unpack_exactly(bits, dims):
    q = 2 ** (bits - 1) - 1
    codes = np.random.default_rng(0).integers(-q, q + 1, size=(11, dims)).astype(np.int8)
    packed = pack_codes(codes, bits)
    assert packed.dtype == np.uint8 and packed.shape == (11, dims if bits == 8 else (dims + 1) // 2)
    assert np.array_equal(unpack_codes(packed, bits, dims), codes)


def test_int8_storage_is_the_8_bit_per_token_quantiser():
    x = np.random.default_rng(1).normal(size=(50, 24)).astype(np.float32) * 3
    q8, s8 = quantize_int8(x)
    q, s = quantize_per_token(x, 8, np.float32)
    assert np.array_equal(q8, q) and np.array_equal(s8, s) and np.abs(q).max() == 127
    q4, s4 = quantize_per_token(x, 4, np.float16)
    assert np.abs(q4).max() == 7 and s4.dtype == np.float16
    # Each value is within half a step of its code (the step is the stored, rounded scale).
    assert np.all(np.abs(x - q4 * s4.astype(np.float32)[:, None]) <= s4.astype(np.float32)[:, None] / 2 + 1e-5)


def test_streamed_moments_equal_the_whole_sample():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(300, 6)) * [5, 3, 1, 1, 0.5, 0.1] + 40  # a large mean: the naive sum loses it
    parts = [TokenMoments.of(x[:7]), TokenMoments.of(x[7:130]), TokenMoments.of(x[130:])]
    whole = TokenMoments.of(x)
    combined = parts[0].combine(parts[1]).combine(parts[2])
    assert combined.count == 300
    assert np.allclose(combined.mean, whole.mean) and np.allclose(combined.scatter, whole.scatter)


def _teacher_grids(root, split):
    from distillery.platform.datasets.coco import load_coco, load_image_resized
    from distillery.teachers import DinoV3Teacher

    ds = load_coco(str(root / "annotations" / f"instances_{split}.json"), str(root / "images" / split))
    teacher = DinoV3Teacher(allow_random_init=True, input_size=128, model_kwargs=TINY_TEACHER)
    images = torch.from_numpy(np.stack([load_image_resized(r.uri, 128) for r in ds.records])).float() / 255
    return teacher(images).numpy()


def test_round_trip_on_teacher_features(synthetic_data):
    """Fitted on the train split's grids, measured on the val split's (held out): the tiny
    teacher's 32 channels at 16 components and 4 bits, 0.16x the bytes of fp16. Bounds measured:
    cosine mean 0.955, min 0.77 (a random-weight one-block teacher is far less redundant than a
    trained ViT-B; see benchmarks/cache_compression.py for the wide teacher)."""
    train, val = _teacher_grids(synthetic_data, "train"), _teacher_grids(synthetic_data, "val")
    codec = fit_codec(train, dims=16, bits=4)
    x = tokens_of(val)
    fp16 = x.astype(np.float16).astype(np.float32)
    y = codec.decode(*codec.encode(x))
    cos = (y * fp16).sum(1) / np.linalg.norm(y, axis=1) / np.linalg.norm(fp16, axis=1)
    assert cos.mean() >= 0.93 and cos.min() >= 0.6, (cos.mean(), cos.min())
    tokens = val.shape[2] * val.shape[3]
    assert codec.bytes_per_image(tokens) <= 0.2 * tokens * val.shape[1] * 2
    # Fewer components lose more: the bound is about the codec, not any lossy round trip.
    few = fit_codec(train, dims=2, bits=4)
    y2 = few.decode(*few.encode(x))
    assert ((y2 * fp16).sum(1) / np.linalg.norm(y2, axis=1) / np.linalg.norm(fp16, axis=1)).mean() < cos.mean() - 0.2
    # Deterministic: the same sample gives the same basis, bit for bit.
    assert fit_codec(train, dims=16, bits=4).to_bytes() == codec.to_bytes()


def test_codec_file_round_trip_and_checks(tmp_path):
    rng = np.random.default_rng(3)
    codec = fit_codec(rng.normal(size=(200, 12)) @ rng.normal(size=(12, 12)), dims=5, bits=8)
    data = codec.to_bytes({"fit_images": 4})
    back, meta = PcaCodec.from_bytes(data, "mem")
    assert np.array_equal(back.basis, codec.basis) and np.array_equal(back.mean, codec.mean)
    assert meta["fit_images"] == 4 and meta["dims"] == 5 and back.bits == 8
    assert np.allclose(back.basis @ back.basis.T, np.eye(5), atol=1e-5)  # orthonormal components
    path = tmp_path / "codec.safetensors"
    path.write_bytes(data)
    assert load_verified_codec(str(path), hashlib.sha256(data).hexdigest()).dims == 5
    with pytest.raises(CodecFileError, match="not the basis the cache was encoded with"):
        load_verified_codec(str(path), "0" * 64)
    with pytest.raises(CodecFileError, match=r"missing\.safetensors is missing"):
        load_verified_codec(str(tmp_path / "missing.safetensors"), "0" * 64)
    with pytest.raises(CodecFileError, match="broken is not a PCA codec file"):
        PcaCodec.from_bytes(data[:40], "broken")
    with pytest.raises(ValueError, match="dims must be between 1 and the teacher's 12 channels"):
        fit_codec(rng.normal(size=(200, 12)), dims=13)
