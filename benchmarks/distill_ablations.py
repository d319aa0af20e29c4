"""The distillation ablations in miniature: the same student, equal steps, the same seeds in every row.

    python benchmarks/distill_ablations.py [--seeds N] [--quick] [--out FILE] [--work-dir DIR]
        [--tracking-uri URI] [--jobs J] [--threads T] [--resume]

Prints one JSON document; each of its ``rows`` has ``name``, ``ap_mean``, ``ap_std``,
``ap50_mean``, ``ap50_std``, ``seeds``, per-seed APs, the mean per-epoch AP curve, ``wall_s`` (the
row's runs added up), ``wall_s_per_seed``, ``img_s`` (training images per second, evaluation
excluded, data pipeline and teacher included) and, beside the baseline, ``vs_baseline``: the
difference to the baseline paired by seed with its 95% t-interval (and ``vs_online`` for the
cached rows).

Rows (RT-DETRv4's central table, and the project's own claims about its cache):

=================  ==================  ================  ==========
row                teacher             features          loss
=================  ==================  ================  ==========
baseline           none                -                 DEIM only
random_teacher     random-weight ViT   cached, fp16      DSI + GAM
dsi_fixed          domain              online            DSI
dsi_gam_online     domain              online            DSI + GAM
dsi_gam_cached     domain              cached, fp16      DSI + GAM
cached_views_k4    domain              cached, K=4       DSI + GAM
int8_cache         domain              cached, int8      DSI + GAM
compressed_cache   domain              cached, pca       DSI + GAM
=================  ==================  ================  ==========

How a run is made (single process, ``distillery.students.fit.fit``: the project's train step,
AdamW parameter groups, flat-cosine schedule, clipping at 0.1, EMA, GAM):

* data: the synthetic shapes (``distillery.platform.datasets.synthetic``), 192 train and 128 val
  images at 128 px; the domain teacher was trained on a disjoint pool (its own seed).
* student: ``rtdetrv4_tiny`` at 128 px, built after ``torch.manual_seed(seed)``; every row builds
  it with the DSI projector (unused without a teacher), so a seed gives every row the same
  initial weights. The seed also sets the batch order (a permutation per (seed, epoch)), the
  augmentation's draws and the cached view an image uses in an epoch.
* batches: what the distillation job's worker does with a Ray Data batch, in process: the
  ingest's own shard reader (``ingest.image_rows_of_shard``, sha256-checked) and join/decode
  (``JoinAndDecode``), ``rows_to_samples`` (cached views replayed), the job's ``Augmenter``
  (DEIM's schedule: photometric, zoom-out, IoU crop in epochs 1-3, Mosaic and Mixup in epoch 1,
  the last 3 epochs without strong ops), ``collate`` and the job's teacher signal (``CachedTeacher`` renders
  the cached grids through the augmentation onto F5; ``OnlineTeacher`` runs the teacher on the
  augmented batch).
* caches: real caches, written by the cache job (``run_cache_job``: Ray Data, the teacher,
  ``FeatureCacheWriter``) once per teacher and layout, under ``--work-dir``, reused by later runs.
* schedule: 7 epochs of 24 steps of batch 8 (168 steps, 1,344 images), lr 1e-3 (backbone 5e-4),
  20 warm-up steps, flat to step 120 then cosine to half, EMA 0.999 (50 warm-ups); after every
  epoch the EMA weights are scored on the val split (COCO AP, ``distillery.evaluation``).
* DSI weight, chosen before the runs: lambda = 5 (the pilot in issue 22 gained +0.058 AP at 5
  and nothing at 1; clipping at 0.1 bounds the DSI gradient with the detection one, so a larger
  weight also shrinks the detection step). ``dsi_fixed`` keeps it fixed (``fit(dsi_weight=5)``).
  The GAM rows start at 5 with the band centred on the AIFI share a calibration run measures at
  lambda 5 (the online domain teacher, 2 epochs, a seed outside the benchmark's; a GAM controller
  past its stop epoch keeps the weight and still measures the share; delta 10% of rho, as the
  RT-DETRv4 maintainers advise), GAM off in the last 3 (no-augmentation) epochs.
* teachers: the domain teacher (``teacher_pretrain.ensure_domain_teacher``: a 6-block, 192-wide
  DINOv3 trained on a synthetic pool of its own seed, disjoint from the student's images; built
  on first use beside the dataset) and a random-weight network of the same architecture.

Sizes (measured on the 2-core VM, loaded by other jobs, one intra-op thread per process, counted
in CPU seconds, which the load does not inflate): a training step of rtdetrv4_tiny at 128 px,
batch 8, about 0.45 CPU-s; one whole baseline run (168 steps, 7 evaluations of 128 images)
90 CPU-s, ending at AP 0.072 / AP50 0.24 (seed 0; still rising by half an epoch to the next).
8 rows x 5 seeds (40 runs, two processes at a time, ``--jobs 2``) are then about 30-35 minutes
on 2 otherwise idle cores, plus the caches, the calibration and, on first use, the domain
teacher. ``--quick`` is a plumbing run for CI (baseline and random teacher, 1 seed, 4 steps on
16 images, a tiny teacher), not a claim about learning.

MLflow (``--tracking-uri``, default ``sqlite:///<work-dir>/mlflow.db``): a parent run with the
summary and the plot of the per-epoch AP curves of every row, one child run per (row, seed).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.paired import (BaseSettings, EpochScorer, add_common_args, common_setup, log_runs,  # noqa: E402
                              paired_difference, plot_curves, row_summary, run_all)
from distillery.platform.config.augment import AugmentSettings, runtime_augment_config  # noqa: E402
from distillery.platform.config.cache import CacheLocation  # noqa: E402
from distillery.platform.config.sections import DataConfig, TeacherConfig  # noqa: E402
from distillery.platform.io import storage  # noqa: E402
from distillery.platform.teacher_pretrain.domain import DOMAIN_MODEL_KWARGS, DOMAIN_MODEL_NAME  # noqa: E402

STUDENT = "rtdetrv4_tiny"
TINY_TEACHER = {"embed_dim": 32, "depth": 1, "num_heads": 2}  # --quick (configs/distill_tiny.yaml's)
LAMBDA = 5.0
CALIBRATION_SEED = 1_000_003  # outside every benchmark seed set


@dataclass(frozen=True)
class Settings(BaseSettings):
    epochs: int = 7
    lr: float = 1e-3
    backbone_lr: float = 5e-4
    flat_steps: int = 120
    lambda0: float = LAMBDA
    calibration_epochs: int = 2
    shard_size: int = 32
    # DEIM's schedule compressed to 7 epochs: strong ops in [1, 4), Mosaic and Mixup in epoch 1, the
    # last 3 epochs clean. (With strong ops in [1, 6) a baseline run ended at AP 0.027, with this
    # schedule at 0.072, seed 0: at this budget the strong ops cost most of what the student learns.)
    policy_epochs: tuple[int, int, int] = (1, 2, 4)
    mixup_epochs: tuple[int, int] = (1, 2)
    # The teachers' architecture: the domain teacher's (6 blocks of width 192; pool 2 gives the 4x4
    # grid of F5 at 128 px); the random teacher is the same network with random weights.
    teacher_model: str = DOMAIN_MODEL_NAME
    teacher_kwargs: dict[str, Any] = field(default_factory=lambda: dict(DOMAIN_MODEL_KWARGS))

    @property
    def steps(self) -> int:
        return self.epochs * self.steps_per_epoch

    def augment(self) -> AugmentSettings:
        return AugmentSettings(policy_epochs=self.policy_epochs, mixup_epochs=self.mixup_epochs)


QUICK = Settings(train=16, val=8, batch=4, epochs=2, steps_per_epoch=2, warmup_steps=1, flat_steps=3,
                 ema_warmups=2, calibration_epochs=1, shard_size=8, eval_batch=8, policy_epochs=(1, 2, 2),
                 mixup_epochs=(1, 2), teacher_kwargs=dict(TINY_TEACHER))


@dataclass(frozen=True)
class Row:
    name: str
    teacher: str | None = None          # None, "random" or "domain"
    features: str = "-"                 # "-", "online" or "cached"
    cache: str | None = None            # a key of CACHES
    gam: bool = False                   # DSI weight steered by GAM (else fixed at lambda0)
    measure_share: bool = False         # the calibration: a fixed weight, the AIFI share measured

    @property
    def loss(self) -> str:
        return "DEIM" if self.teacher is None else ("DSI + GAM" if self.gam else "DSI")


@dataclass(frozen=True)
class CacheSpec:
    teacher: str
    dtype: str = "fp16"
    views: int = 1


# pca: the compressed cache (cache.dtype: pca, its default codec: a quarter of the channels, 8 bits).
CACHES = {"random_fp16": CacheSpec("random"), "domain_fp16": CacheSpec("domain"),
          "domain_k4": CacheSpec("domain", views=4), "domain_int8": CacheSpec("domain", dtype="int8"),
          "domain_pca": CacheSpec("domain", dtype="pca")}

ROWS = (Row("baseline"),
        Row("random_teacher", "random", "cached", "random_fp16", gam=True),
        Row("dsi_fixed", "domain", "online"),
        Row("dsi_gam_online", "domain", "online", gam=True),
        Row("dsi_gam_cached", "domain", "cached", "domain_fp16", gam=True),
        Row("cached_views_k4", "domain", "cached", "domain_k4", gam=True),
        Row("int8_cache", "domain", "cached", "domain_int8", gam=True),
        Row("compressed_cache", "domain", "cached", "domain_pca", gam=True))
ONLINE_REFERENCE = "dsi_gam_online"


# --------------------------------------------------------------------------- teachers

def domain_teacher(settings: Settings, data_root: str) -> TeacherConfig:
    """The domain teacher (a DINOv3 trained on a synthetic pool of its own seed, disjoint from the
    student's images; built on first use beside the dataset, reused after) as a teacher config."""
    from distillery.platform.teacher_pretrain.domain import ensure_domain_teacher

    teacher = ensure_domain_teacher(data_root, image_size=settings.size)
    return TeacherConfig(**teacher.teacher_kwargs(), dtype="float32")


def random_teacher(settings: Settings) -> TeacherConfig:
    """A random-weight teacher of the domain teacher's architecture (``--quick``: a tiny one)."""
    return TeacherConfig(model_name=settings.teacher_model, model_kwargs=settings.teacher_kwargs,
                         allow_random_init=True, seed=0, input_size=settings.size, pool=2, dtype="float32")


# --------------------------------------------------------------------------- caches

def build_caches(names: list[str], teachers: dict[str, TeacherConfig], data: DataConfig, settings: Settings,
                 work: Path) -> dict[str, dict[str, Any]]:
    """Each cache by the cache job (reused when its manifest is there); name -> location and job summary."""
    from distillery.platform.cache.job import run_cache_job
    from distillery.platform.config.cache import CacheComputeConfig, CacheFeaturesConfig, CacheSettings
    from distillery.platform.config.sections import RayConfig

    out = {}
    for name in names:
        spec = CACHES[name]
        location = CacheSettings(uri=str(work / "cache" / name), dtype=spec.dtype, shard_size=settings.shard_size,
                                 views=spec.views, view_recipe=settings.augment().view_recipe())
        cfg = CacheFeaturesConfig(data=data, teacher=teachers[spec.teacher], cache=location,
                                  compute=CacheComputeConfig(actors=1, batch_size=32, gpus_per_actor=0),
                                  ray=RayConfig(num_cpus=4))
        t0 = time.perf_counter()
        summary = run_cache_job(cfg)["train"]
        out[name] = {"location": location,
                     "seconds": round(time.perf_counter() - t0, 1),
                     **{k: summary[k] for k in ("images", "bytes_per_image", "teacher_forwards", "dtype", "views")}}
    return out


# --------------------------------------------------------------------------- one run

@dataclass(frozen=True)
class RunSpec:
    row: Row
    seed: int
    settings: Settings
    data: DataConfig
    teacher: TeacherConfig | None       # the row's teacher (its architecture sizes every student's projector)
    teacher_dim: int
    cache: CacheLocation | None
    gam_band: tuple[float, float] | None
    threads: int = 1
    epochs: int | None = None           # calibration: fewer epochs


def _gam(spec: RunSpec):
    """The row's GAM controller; None for the baseline and the fixed weight (``fit(dsi_weight=)``)."""
    from distillery.students.gam import GAMController

    s = spec.settings
    if spec.row.measure_share:
        # Past its stop epoch from the start: the weight is lambda0 in every epoch, and the AIFI
        # share is still measured (what the calibration reads).
        return GAMController(lambda0=s.lambda0, rho=0.5, delta=0.25, default_weight=s.lambda0, stop_epoch=0)
    if spec.row.teacher is None or not spec.row.gam:
        return None
    rho, delta = spec.gam_band
    return GAMController(lambda0=s.lambda0, rho=rho, delta=delta, default_weight=s.lambda0,
                         stop_epoch=s.policy_epochs[2])


def step_batches(train, *, seed: int, batch: int, steps_per_epoch: int, augmenter, signal, cache_uri: str | None,
                 device) -> Iterator[dict[str, Any]]:
    """Endless step batches as the distillation worker makes them (``DistillJob._step_batch``), fed
    in process instead of by Ray Data: a permutation of the train ids per (seed, epoch), each
    batch through the ingest's join and decode, ``rows_to_samples`` (the epoch's cached view
    replayed), the augmenter, ``collate`` and the teacher signal."""
    from distillery.data.sample import collate
    from distillery.platform.cache.feature_cache import FeatureCache
    # The ingest's own pieces: its shard reader (the Ray Data flat_map), its join and decode, its samples.
    from distillery.platform.engine.ingest import (JoinAndDecode, image_rows_of_shard, annotation_table,
                                                     rows_to_samples)

    decode = JoinAndDecode(annotation_table(train), "error", None)
    cache_rows: dict[int, dict[str, Any]] = {}
    cache_meta, views = None, 1
    if cache_uri is not None:
        cache = FeatureCache(storage.join(cache_uri, "train"))
        cache.check_covers(train.image_ids)
        for shard, info in zip(cache.shard_uris, cache.manifest["shards"]):
            for row in image_rows_of_shard({"uri": shard, "sha256": info["sha256"], "manifest": cache.manifest_uri},
                                            cache.views):
                cache_rows[row["image_id"]] = row
        cache_meta = cache.ingest_meta()  # what the driver hands the workers (pca: its basis, checked)
        views = cache.views
    ids = np.asarray(sorted(train.image_ids), dtype=np.int64)
    if len(ids) < batch * steps_per_epoch:
        raise ValueError(f"{steps_per_epoch} steps of {batch} need {batch * steps_per_epoch} train images, "
                         f"the split has {len(ids)}")
    e0 = augmenter.cfg.policy_epochs[0]
    for epoch in itertools.count():
        order = np.random.default_rng([seed, epoch]).permutation(ids)
        for step in range(steps_per_epoch):
            chosen = order[step * batch:(step + 1) * batch]
            raw: dict[str, Any] = {"image_id": chosen}
            if cache_rows:
                for key in ("features", "scale") + (("params",) if views > 1 else ()):
                    column = np.empty(len(chosen), dtype=object)
                    column[:] = [cache_rows[int(i)][key] for i in chosen]
                    raw[key] = column
            rows = decode(raw)
            # Cached views serve the strong-augmentation epochs only (as in the job).
            view_epoch = epoch - e0 if views > 1 and augmenter.strong(epoch) else None
            samples = augmenter.batch(rows_to_samples(rows, cache_meta, view_epoch=view_epoch, seed=seed), epoch)
            b = collate(samples, f5_hw=None)
            images = b["images"].to(device)
            targets = [{k: v.to(device) for k, v in t.items() if k != "image_id"} for t in b["targets"]]
            yield {"images": images, "targets": targets, **signal.batch_inputs(samples, images)}


def run_one(spec: RunSpec) -> dict[str, Any]:
    """Train one (row, seed) and score the EMA weights after every epoch."""
    import torch

    from distillery.data.augment import Augmenter
    from distillery.platform.datasets.formats import load_split
    from distillery.platform.distill.teacher_signal import teacher_signal
    from distillery.students import build_criterion, build_student
    from distillery.students.fit import fit

    torch.set_num_threads(spec.threads)
    t0, cpu0 = time.perf_counter(), time.process_time()
    s, row = spec.settings, spec.row
    epochs = spec.epochs or s.epochs
    device = torch.device("cpu")
    train = load_split(spec.data, "train")

    mode = "none" if row.teacher is None else row.features
    signal = teacher_signal(SimpleNamespace(teacher_mode=mode, teacher=spec.teacher,
                                            cache=spec.cache if spec.cache is not None else CacheLocation()))
    augmenter = Augmenter(runtime_augment_config(s.augment(), s.size), seed=spec.seed * 1000)
    signal.cache_views(augmenter.cfg)  # a cached row: its views against the manifest and the recipe
    signal.start(device, "float32")

    random.seed(spec.seed)
    np.random.seed(spec.seed)
    torch.manual_seed(spec.seed)
    model = build_student(STUDENT, num_classes=train.categories.num_classes, eval_spatial_size=s.size, dsi=True,
                          teacher_dim=spec.teacher_dim)
    criterion = build_criterion(num_classes=train.categories.num_classes)
    gam = _gam(spec)

    def gam_numbers() -> dict[str, float]:
        if gam is None or not gam.history:
            return {}
        return {"aifi_share": round(gam.history[-1]["ratio"], 6), "lambda_next": gam.history[-1]["lambda_after"]}

    scorer = EpochScorer(spec.data, s.size, s.eval_batch, s.steps_per_epoch, f"{row.name} seed {spec.seed}",
                         gam_numbers)
    steps = epochs * s.steps_per_epoch
    batches = step_batches(train, seed=spec.seed, batch=s.batch, steps_per_epoch=s.steps_per_epoch,
                           augmenter=augmenter, signal=signal,
                           cache_uri=spec.cache.uri if spec.cache is not None else None, device=device)
    result = fit(model, criterion, batches, steps=steps, lr=s.lr,
                 backbone_lr=s.backbone_lr, warmup_steps=s.warmup_steps, flat_steps=min(s.flat_steps, steps),
                 ema_decay=s.ema_decay, ema_warmups=s.ema_warmups, gam=gam, steps_per_epoch=s.steps_per_epoch,
                 dsi_weight=s.lambda0 if row.teacher is not None and gam is None else None, on_epoch_end=scorer)
    train_seconds = result.seconds - scorer.seconds
    curve = scorer.curve
    return {"row": row.name, "seed": spec.seed, "ap": curve[-1]["AP"], "ap50": curve[-1]["AP50"], "epochs": curve,
            "wall_s": round(time.perf_counter() - t0, 1), "cpu_s": round(time.process_time() - cpu0, 1),
            "train_s": round(train_seconds, 1), "eval_s": round(scorer.seconds, 1),
            "img_s": round(steps * s.batch / train_seconds, 2),
            "params": {"teacher": row.teacher or "none", "features": row.features, "loss": row.loss,
                       "cache": row.cache or "-", "threads": spec.threads}}


# --------------------------------------------------------------------------- the benchmark

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(parser, "runs/distill_ablations")
    parser.add_argument("--rows", help="comma-separated row names (default: all; --quick: baseline,random_teacher)")
    args = parser.parse_args()

    settings = QUICK if args.quick else Settings()
    names = args.rows.split(",") if args.rows else (["baseline", "random_teacher"] if args.quick else
                                                    [r.name for r in ROWS])
    unknown = sorted(set(names) - {r.name for r in ROWS})
    if unknown:
        parser.error(f"--rows: unknown rows {unknown}; known: {[r.name for r in ROWS]}")
    rows = [r for r in ROWS if r.name in names]
    t0 = time.perf_counter()
    seeds, jobs, work, tracking_uri, data = common_setup(args, settings.train, settings.val, settings.size,
                                                         settings.data_seed)

    teachers: dict[str, TeacherConfig] = {"random": random_teacher(settings)}
    if any(r.teacher == "domain" for r in rows):
        teachers["domain"] = domain_teacher(settings, data.root)

    from distillery.platform.cluster.runtime import ray_session
    from distillery.platform.config.sections import RayConfig

    cache_names = sorted({r.cache for r in rows if r.cache is not None})
    caches = {}
    if cache_names:
        with ray_session(RayConfig(num_cpus=4)):  # one local Ray instance for all the cache jobs
            caches = build_caches(cache_names, teachers, data, settings, work)
    dims = {name: _embed_dim(t) for name, t in teachers.items()}
    teacher_dim = dims.get("domain", dims["random"])

    # The GAM band, fixed before the runs: the AIFI share at lambda0 with the teacher the GAM rows learn
    # from (the domain teacher online; the random one when there is no domain teacher).
    band, calibration = None, None
    if any(r.gam for r in rows):
        cal_teacher = "domain" if "domain" in teachers else "random"
        cal_row = Row("calibration", cal_teacher, "online", measure_share=True)
        cal = run_one(RunSpec(cal_row, CALIBRATION_SEED, settings, data, teachers[cal_teacher], teacher_dim, None,
                              None, args.threads, epochs=settings.calibration_epochs))
        rho = float(np.mean([e["aifi_share"] for e in cal["epochs"]]))
        band = (rho, rho / 10)
        calibration = {"teacher": cal_teacher, "seed": CALIBRATION_SEED, "epochs": cal["epochs"],
                       "rho": round(rho, 6), "delta": round(rho / 10, 6), "wall_s": cal["wall_s"]}

    specs = [RunSpec(r, seed, settings, data, teachers.get(r.teacher or "random"), teacher_dim,
                     caches[r.cache]["location"] if r.cache else None, band, args.threads)
             for seed in seeds for r in rows]
    results = run_all(run_one, specs, jobs, work / "runs.jsonl", key=lambda t: f"{t.row.name}/seed{t.seed}",
                      resume=args.resume)

    by_row = {r.name: [x for x in results if x["row"] == r.name] for r in rows}
    ap = {name: {x["seed"]: x["ap"] for x in runs} for name, runs in by_row.items()}
    table = []
    for r in rows:
        entry = {**row_summary(r.name, by_row[r.name]), "teacher": r.teacher or "none", "features": r.features,
                 "cache": r.cache, "loss": r.loss}
        if r.name != "baseline" and "baseline" in ap:
            entry["vs_baseline"] = paired_difference(ap[r.name], ap["baseline"])
        if r.features == "cached" and r.teacher == "domain" and ONLINE_REFERENCE in ap:
            entry["vs_online"] = paired_difference(ap[r.name], ap[ONLINE_REFERENCE])
        table.append(entry)

    plot = work / "distill_ablations.png"
    plot_curves(by_row, plot, f"{STUDENT} at {settings.size} px, {settings.steps} steps of {settings.batch}, "
                              f"{len(seeds)} seed(s), {settings.val} val images")
    document = {
        "benchmark": "distill_ablations", "quick": args.quick, "student": STUDENT, "seeds": seeds,
        "settings": {**asdict(settings), "steps": settings.steps},
        "teachers": {k: v.model_dump(mode="json") for k, v in teachers.items()},
        "caches": {k: {kk: vv for kk, vv in v.items() if kk != "location"} for k, v in caches.items()},
        "gam_calibration": calibration, "rows": table, "runs": results, "jobs": jobs, "threads": args.threads,
        "cpu_count": os.cpu_count(), "plot": str(plot), "tracking_uri": tracking_uri,
        "wall_s": round(time.perf_counter() - t0, 1)}
    document["mlflow_parent_run_id"] = log_runs(
        tracking_uri, "distill-ablations", "distill_ablations",
        {"student": STUDENT, "seeds": len(seeds), "steps": settings.steps, "batch": settings.batch,
         "train_images": settings.train, "val_images": settings.val, "lambda0": settings.lambda0,
         "gam_rho": band[0] if band else None, "quick": args.quick}, results, document, [str(plot)])
    text = json.dumps(document)
    if args.out:
        storage.write_text(str(Path(args.out).resolve()), text + "\n")
    print(text)


def _embed_dim(cfg: TeacherConfig) -> int:
    """The teacher's width, from the config the teacher is built from."""
    from distillery.platform.cache.job import build_teacher

    return int(build_teacher(cfg.model_dump(), "float32").embed_dim)


if __name__ == "__main__":
    main()
