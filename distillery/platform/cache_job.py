"""The feature-cache job: stream a COCO dataset through the frozen teacher with Ray Data.

Pipeline (one Ray Data row = one planned shard, so a shard is the unit of work and of resume)::

    from_items(shard plans)                      driver: which images go in which shard
      .map(decode + resize, CPU tasks)           -> (S, 3, H, W) uint8
      .map_batches(TeacherActor, ActorPool)      -> (S, C, h, w) float32; GPU when present
      .map(write shard, CPU tasks)               -> Parquet file (atomic) + its checksum
    driver: collect shard infos, write manifest.json last

Resume: shards are planned deterministically from the sorted image ids, so a rerun lists the
finished shard files, computes only the missing ones and ends with the same manifest.

Decoding happens in CPU tasks (PIL), not on the GPU: the teacher input is the resized 640-px
image the student also sees, JPEG decode of the dataset's small files parallelises across the
node's cores, and it keeps the GPU actor doing only teacher forwards.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any, Literal

import numpy as np
from pydantic import Field, PositiveInt

from distillery.platform import storage
from distillery.platform.coco import CocoDataset, load_coco, load_image_resized
from distillery.platform.config import (DataConfig, RayConfig, StorageConfig, StrictModel,
                                        TeacherConfig, absolute_uri)
from distillery.platform.feature_cache import FeatureCacheWriter, ShardInfo, plan_shards

__all__ = ["CacheFeaturesConfig", "build_teacher", "ensure_dataset", "resolve_teacher_dtype",
           "run_cache_job"]

log = logging.getLogger(__name__)


class CacheSettings(StrictModel):
    uri: str = "runs/cache/synthetic-dinov3-vitb16"
    dtype: Literal["fp16", "int8"] = "fp16"
    shard_size: PositiveInt = 32
    splits: list[Literal["train", "val"]] = Field(default_factory=lambda: ["train"], min_length=1)


class CacheComputeConfig(StrictModel):
    actors: PositiveInt = 1
    batch_size: PositiveInt = 16
    gpus_per_actor: float | Literal["auto"] = "auto"
    cpus_per_actor: float = Field(1.0, gt=0)
    decode_cpus: float = Field(1.0, gt=0)


class CacheDebugConfig(StrictModel):
    # Fault injection for tests: write only this many of the missing shards, then fail (as a job
    # killed halfway would: some shards on storage, no manifest).
    stop_after_shards: PositiveInt | None = None


def _default_teacher() -> TeacherConfig:
    # No checkpoint can be downloaded on a fresh machine: the embedded default asks for random
    # weights explicitly (a loud warning says so, and the fingerprint records it).
    return TeacherConfig(allow_random_init=True)


class CacheFeaturesConfig(StrictModel):
    data: DataConfig = Field(default_factory=DataConfig)
    teacher: TeacherConfig = Field(default_factory=_default_teacher)
    cache: CacheSettings = Field(default_factory=CacheSettings)
    compute: CacheComputeConfig = Field(default_factory=CacheComputeConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    debug: CacheDebugConfig = Field(default_factory=CacheDebugConfig)


class CacheInterrupted(RuntimeError):
    """Raised by the ``debug.stop_after_shards`` fault-injection hook."""


# --------------------------------------------------------------------------- helpers

def ensure_dataset(data: DataConfig) -> None:
    """Generate the synthetic dataset if it is configured and absent."""
    ann, _ = data.split_paths("train")
    if storage.exists(ann) or data.synthetic is None:
        return
    from distillery.platform.synthetic import generate_synthetic_coco

    s = data.synthetic
    log.info("generating the synthetic dataset under %s", data.root)
    generate_synthetic_coco(data.root, train=s.train, val=s.val, size=s.size, seed=s.seed)


def resolve_teacher_dtype(cfg: TeacherConfig, on_gpu: bool) -> str:
    if cfg.dtype != "auto":
        return cfg.dtype
    return "bfloat16" if on_gpu else "float32"


def build_teacher(cfg: dict[str, Any], dtype: str):
    """Build the frozen teacher from a TeacherConfig dict (runs in actors and on the driver)."""
    import torch

    from distillery.teachers import DinoV3Teacher

    return DinoV3Teacher(model_name=cfg["model_name"], weights=cfg["weights"],
                         allow_random_init=cfg["allow_random_init"], seed=cfg["seed"],
                         input_size=cfg["input_size"], pool=cfg["pool"], dtype=getattr(torch, dtype),
                         model_kwargs=cfg["model_kwargs"] or None)


def _decode_shard(row: dict[str, Any], size: int) -> dict[str, Any]:
    uris = [str(u) for u in row["uris"]]
    images = np.stack([load_image_resized(u, size) for u in uris])
    return {"shard": int(row["shard"]), "image_ids": np.asarray(row["image_ids"], dtype=np.int64),
            "images": images}


class _TeacherActor:
    """Holds one frozen teacher; each call runs the teacher over one shard in micro-batches."""

    def __init__(self, teacher_cfg: dict[str, Any], dtype: str, batch_size: int, threads: int):
        import torch

        torch.set_num_threads(threads)  # the actor's CPU share (matters when there is no GPU)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.teacher = build_teacher(teacher_cfg, dtype).to(self.device)
        self.batch_size = batch_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        import torch

        out_feats = []
        started = time.time()  # wall clock: the driver measures steady-state throughput from it
        for images in batch["images"]:  # one shard per row (batch_size=1: shards may differ in length)
            feats = []
            for i in range(0, len(images), self.batch_size):
                x = torch.from_numpy(np.ascontiguousarray(images[i:i + self.batch_size])).to(
                    self.device, non_blocking=True)
                feats.append(self.teacher(x.float().div_(255.0)).float().cpu().numpy())
            out_feats.append(np.concatenate(feats))
        # "forwards" counts images through the teacher: tests use it to prove resume skips work.
        return {"shard": batch["shard"], "image_ids": batch["image_ids"],
                "features": np.stack(out_feats), "forwards": np.asarray([len(f) for f in out_feats]),
                "started": np.full(len(out_feats), started)}


def _write_shard(row: dict[str, Any], writer_args: dict[str, Any]) -> dict[str, Any]:
    writer = FeatureCacheWriter(**writer_args)
    info = writer.write_shard(int(row["shard"]), [int(i) for i in row["image_ids"]], row["features"])
    return {**info.to_dict(), "forwards": int(row["forwards"]), "started": float(row["started"])}


# --------------------------------------------------------------------------- the job

def _cache_split(cfg: CacheFeaturesConfig, split: str, dataset: CocoDataset, fingerprint: dict[str, Any],
                 grid: list[int], dtype: str, use_gpu: bool) -> dict[str, Any]:
    import ray

    uri = storage.join(cfg.cache.uri, split)
    dataset_info = {"annotation_uri": dataset.annotation_uri, "annotation_sha256": dataset.annotation_sha256,
                    "num_images": len(dataset), "categories": dataset.categories.to_dict()}
    writer_args = dict(uri=uri, fingerprint=fingerprint, grid=grid, dtype=cfg.cache.dtype,
                       shard_size=cfg.cache.shard_size, dataset=dataset_info)
    writer = FeatureCacheWriter(**writer_args)
    shards = plan_shards(dataset.image_ids, cfg.cache.shard_size)
    todo = writer.begin(shards)
    uri_of = {r.image_id: r.uri for r in dataset.records}
    log.info("%s: %d shards planned, %d to compute, %d already written", uri, len(shards), len(todo),
             len(shards) - len(todo))

    t0 = time.perf_counter()
    results: list[dict[str, Any]] = []
    arrivals: list[float] = []
    stop = cfg.debug.stop_after_shards
    if stop is not None:  # fault injection: compute only `stop` shards, then crash (no manifest)
        todo = todo[:stop]
    if todo:
        items = [{"shard": i, "image_ids": shards[i], "uris": [uri_of[iid] for iid in shards[i]]} for i in todo]
        gpus = (1.0 if use_gpu else 0.0) if cfg.compute.gpus_per_actor == "auto" else float(cfg.compute.gpus_per_actor)
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        decode_cpus = cfg.compute.decode_cpus
        # Decode in CPU tasks, not inside the teacher actor: Ray Data would fuse this map into
        # the actor stage when their resources match; a remote-args function opts out of fusion.
        ds = ds.map(_decode_shard, fn_kwargs={"size": cfg.teacher.input_size},
                    ray_remote_args_fn=lambda: {"num_cpus": decode_cpus})
        ds = ds.map_batches(
            _TeacherActor, batch_size=1, batch_format="numpy",
            fn_constructor_kwargs={"teacher_cfg": cfg.teacher.model_dump(), "dtype": dtype,
                                   "batch_size": cfg.compute.batch_size,
                                   "threads": max(1, int(cfg.compute.cpus_per_actor))},
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=cfg.compute.actors),
            num_gpus=gpus, num_cpus=cfg.compute.cpus_per_actor)
        ds = ds.map(_write_shard, fn_kwargs={"writer_args": writer_args}, num_cpus=0.25)
        for row in ds.iter_rows():
            results.append(row)
            arrivals.append(time.time())
    if stop is not None:
        raise CacheInterrupted(f"debug.stop_after_shards={stop}: stopped after {len(results)} shards")
    elapsed = time.perf_counter() - t0

    written = [ShardInfo(**{k: v for k, v in r.items() if k not in ("forwards", "started")}) for r in results]
    manifest = writer.finalize(len(shards), written)
    forwards = sum(int(r["forwards"]) for r in results)
    n_computed = sum(int(r["count"]) for r in results)
    # Steady state: from the first teacher forward to the last shard written (pipeline and actor
    # start-up excluded: what a long job over a large dataset sees).
    steady = None
    if results:
        span = max(arrivals) - min(float(r["started"]) for r in results)
        steady = round(n_computed / span, 2) if span > 0 else None
    return {"split": split, "uri": uri, "images": manifest["count"], "shards": len(shards),
            "shards_computed": len(results), "shards_reused": len(shards) - len(results),
            "teacher_forwards": forwards, "seconds": round(elapsed, 3),
            "images_per_second": round(n_computed / elapsed, 2) if results and elapsed > 0 else None,
            "steady_images_per_second": steady,
            "bytes": sum(s["bytes"] for s in manifest["shards"]),
            "bytes_per_image": round(sum(s["bytes"] for s in manifest["shards"]) / manifest["count"], 1),
            "grid": grid, "dtype": cfg.cache.dtype,
            "fingerprint_digest": manifest["fingerprint_digest"]}


def run_cache_job(cfg: CacheFeaturesConfig) -> dict[str, Any]:
    """Build (or resume) the feature cache of every configured split; return a summary per split."""
    from distillery.platform.cluster import cluster_has_gpus, ray_session

    cfg = cfg.model_copy(deep=True)  # relative local paths resolved here: Ray workers run elsewhere
    cfg.data.root, cfg.cache.uri = absolute_uri(cfg.data.root), absolute_uri(cfg.cache.uri)
    if cfg.teacher.weights:
        cfg.teacher.weights = absolute_uri(cfg.teacher.weights)
    ensure_dataset(cfg.data)
    datasets = {}
    for split in cfg.cache.splits:
        ann, images = cfg.data.split_paths(split)
        report = storage.join(cfg.cache.uri, split, "bad_records.jsonl")
        datasets[split] = load_coco(ann, images, bad_records=cfg.data.bad_records,
                                    check_images=cfg.data.check_images, report_uri=report)
    with ray_session(cfg.ray, cfg.storage):
        use_gpu = cluster_has_gpus() and cfg.compute.gpus_per_actor != 0
        dtype = resolve_teacher_dtype(cfg.teacher, use_gpu)
        # The driver builds the teacher once (CPU) for its fingerprint and grid shape.
        teacher = build_teacher(cfg.teacher.model_dump(), dtype)
        fingerprint = teacher.fingerprint
        grid = [teacher.embed_dim, *teacher.grid_size]
        del teacher
        summary = {split: _cache_split(cfg, split, ds, fingerprint, grid, dtype, use_gpu)
                   for split, ds in datasets.items()}
    log.info("cache summary: %s", json.dumps(summary))
    return summary
