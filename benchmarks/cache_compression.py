"""Compressed feature cache (``cache.dtype: pca``): bytes per image against fp16 and int8, and
the cosine similarity of the decoded features against fp16.

Prints one JSON line. For each teacher (``--teachers``), on synthetic images: the codec is
fitted on the teacher's grids of the first ``--fit-images`` images (as the cache job does) and
measured on the other images (held out), per token: cosine of the decoded (H*W, C) features
against the fp16-stored ones, mean and min over all held-out tokens. Bytes per image: the row
payload (``features`` + ``scale`` bytes) and the Parquet shard bytes per image of a real cache
written by ``FeatureCacheWriter`` (``--shard-size`` images per shard), for fp16, int8 and each
codec; int8's cosine against fp16 alongside.

    python benchmarks/cache_compression.py [--teachers tiny,vitb16-256] [--images 48] [--fit-images 24]
                                           [--codecs default,16x4,...] [--weights PATH]
        [--teachers custom --model-name vit_small_patch16_dinov3 --model-kwargs '{...}' --input-size 128]

Teachers: ``tiny`` is the CI teacher (configs/distill_tiny.yaml: 32 channels, one block, 128 px,
4x4 grid); ``vitb16-256`` a DINOv3 ViT-B/16 (768 channels) at 256 px (8x8 grid); ``vitb16-640``
the RT-DETRv4 input (20x20 grid); ``custom`` the one given by ``--model-name``, ``--model-kwargs``
and ``--input-size`` (e.g. a domain teacher's file with ``--weights``). Without ``--weights`` the
teachers have random weights (stated in the output): a trained teacher's features may compress
differently.
``--codecs``: ``DxB`` (D components, or a fraction of the channels when D < 1, at B bits) or
``default`` (the ``cache.pca`` defaults).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

TEACHERS = {
    "tiny": {"input_size": 128, "model_kwargs": {"embed_dim": 32, "depth": 1, "num_heads": 2},
             "codecs": "default,0.5x4,0.5x8"},
    "vitb16-256": {"input_size": 256, "model_kwargs": None, "codecs": "default,64x8,128x4,128x8,256x8"},
    "vitb16-640": {"input_size": 640, "model_kwargs": None, "codecs": "default,128x4,128x8,256x8"},
}


def parse_codec(text: str):
    from distillery.platform.config.cache import PcaSettings

    if text == "default":
        return PcaSettings()
    dims, bits = text.split("x")
    return PcaSettings(dims=float(dims) if "." in dims else int(dims), bits=int(bits))


def measure_teacher(name: str, args) -> dict:
    import numpy as np
    import torch

    from distillery.platform.cache.codec import TokenMoments, fit_codec, tokens_of
    from distillery.platform.cache.codec import decode_features, encode_features
    from distillery.platform.cache.feature_cache import FeatureCacheWriter, plan_shards
    from distillery.platform.datasets.coco import load_coco, load_image_resized
    from distillery.platform.datasets.synthetic import generate_synthetic_coco
    from distillery.teachers import DinoV3Teacher

    spec = TEACHERS[name] if name != "custom" else {
        "input_size": args.input_size, "model_kwargs": json.loads(args.model_kwargs) or None, "codecs": "default"}
    size = spec["input_size"]
    model_name = args.model_name if name == "custom" else "vit_base_patch16_dinov3"
    teacher = DinoV3Teacher(model_name=model_name, weights=args.weights, allow_random_init=args.weights is None,
                            input_size=size, model_kwargs=spec["model_kwargs"])
    work = Path(tempfile.mkdtemp(prefix="compression-"))
    generate_synthetic_coco(work / "data", train=args.images, val=1, size=max(size, 128), seed=args.seed)
    ds = load_coco(str(work / "data" / "annotations" / "instances_train.json"), str(work / "data" / "images" / "train"))
    images = np.stack([load_image_resized(r.uri, size) for r in ds.records])
    with torch.inference_mode():
        grids = np.concatenate([teacher(torch.from_numpy(images[i:i + 8]).float() / 255).float().numpy()
                                for i in range(0, len(images), 8)])
    c, h, w = grids.shape[1:]
    fit, held = grids[:args.fit_images], grids[args.fit_images:]
    ids = [r.image_id for r in ds.records]
    moments = TokenMoments.of(fit)

    def cosine(decoded: np.ndarray, reference: np.ndarray) -> np.ndarray:
        return (decoded * reference).sum(1) / (np.linalg.norm(decoded, axis=1) * np.linalg.norm(reference, axis=1))

    def shard_bytes_per_image(dtype: str, codec=None) -> float:
        uri = tempfile.mkdtemp(dir=work)
        record = {"method": "pca", "file": "codec", "sha256": "0" * 64} if codec is not None else None
        writer = FeatureCacheWriter(uri, teacher.fingerprint, [c, h, w], dtype, args.shard_size, {},
                                    codec=codec, codec_record=record)
        shards = plan_shards(ids, args.shard_size)
        writer.begin(shards)
        index = {iid: k for k, iid in enumerate(ids)}
        infos = [writer.write_shard(k, s, grids[[index[i] for i in s]]) for k, s in enumerate(shards)]
        return round(sum(i.bytes for i in infos) / len(ids), 1)

    def payload(dtype: str, codec=None) -> int:
        f, s = encode_features(grids[0], dtype, codec)
        return len(f) + (len(s) if s is not None else 0)

    reference = tokens_of(held).astype(np.float16).astype(np.float32)  # what an fp16 cache gives back
    int8_cos = cosine(np.concatenate([decode_features(*encode_features(g, "int8"), "int8", [c, h, w])
                                      .reshape(c, -1).T for g in held]), reference)
    fp16_bytes, int8_bytes = payload("fp16"), payload("int8")
    codecs = []
    for text in (args.codecs or spec["codecs"]).split(","):
        settings = parse_codec(text)
        codec = fit_codec(moments, settings.resolved_dims(c), settings.bits)
        cos = cosine(codec.decode(*codec.encode(tokens_of(held))), reference)
        nbytes = payload("pca", codec)
        assert nbytes == codec.bytes_per_image(h * w)
        codecs.append({"codec": text, "dims": codec.dims, "bits": codec.bits, "bytes_per_image": nbytes,
                       "vs_fp16": round(nbytes / fp16_bytes, 4), "vs_int8": round(nbytes / int8_bytes, 4),
                       "shard_bytes_per_image": shard_bytes_per_image("pca", codec),
                       "explained_variance": round(codec.explained_variance, 5),
                       "cos_mean": round(float(cos.mean()), 5), "cos_min": round(float(cos.min()), 5)})
    return {"teacher": name, "model_name": model_name, "weights": args.weights or "random-init", "input_size": size, "grid": [c, h, w],
            "fit_images": len(fit), "held_out_images": len(held), "held_out_tokens": int(len(reference)),
            "fp16_bytes_per_image": fp16_bytes, "int8_bytes_per_image": int8_bytes,
            "fp16_shard_bytes_per_image": shard_bytes_per_image("fp16"),
            "int8_shard_bytes_per_image": shard_bytes_per_image("int8"),
            "int8_cos_mean": round(float(int8_cos.mean()), 5), "int8_cos_min": round(float(int8_cos.min()), 5),
            "codecs": codecs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teachers", default="tiny,vitb16-256")
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--fit-images", type=int, default=24)
    parser.add_argument("--shard-size", type=int, default=8)
    parser.add_argument("--codecs", default=None, help="comma-separated DxB or 'default' (else per teacher)")
    parser.add_argument("--weights", default=None, help="a DINOv3 checkpoint (else random weights)")
    parser.add_argument("--model-name", default="vit_base_patch16_dinov3", help="timm model of --teachers custom")
    parser.add_argument("--model-kwargs", default="{}", help="JSON model overrides of --teachers custom")
    parser.add_argument("--input-size", type=int, default=128, help="input size of --teachers custom")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if not 0 < args.fit_images < args.images:
        parser.error("--fit-images must be between 1 and --images - 1 (the rest are held out)")

    import torch

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    rows = [measure_teacher(name, args) for name in args.teachers.split(",")]
    print(json.dumps({"benchmark": "cache_compression",
                      "machine": f"cpu x{torch.get_num_threads()} ({platform.processor() or platform.machine()})",
                      "images": args.images, "rows": rows}))


if __name__ == "__main__":
    main()
