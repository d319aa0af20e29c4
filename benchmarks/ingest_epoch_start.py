"""What an epoch's Ray Data pipeline costs before and around its data: Distillery's training ingest
against the layout it replaced, side by side in one run.

Prints one JSON line. A synthetic set and its feature cache (tiny random teacher) are built in a
temporary directory on a local Ray instance; then each pipeline is executed ``--epochs`` times the
way Ray Train runs it (built and ``streaming_split`` over two consumers once, re-executed per epoch),
the two pipelines taking turns epoch by epoch:

* ``distillery``: ``ingest.build_train_dataset`` (one task per cache shard reads and verifies it,
  then the join + JPEG decode, fused into the same task);
* ``reference``: the layout before it: ``read_parquet`` over the shards, a ``view == 0`` filter
  and the join + decode in an actor pool (``ActorPoolStrategy(1, 2)``), which Ray Data starts
  again at every execution;
* ``ordered``: ``distillery`` with the execution options the training jobs run it with
  (``launch.ordered_ingest_options``: ``preserve_order``, so that every rank gets the same rows in
  the same order in every run): what fixing the order costs. Its consumers only count rows, so
  this is the cost at its largest; a training step between batches hides more of it.

Per pipeline: median seconds to the first batch and to the end of an epoch, and images per
second, over the epochs after the first (the first also pays process start-up); ``ratio`` =
reference / distillery epoch time, ``ordered_cost`` = ordered / distillery epoch time.

    python benchmarks/ingest_epoch_start.py [--images 16] [--epochs 4] [--shard-size 8]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import ray  # noqa: E402
import ray.data  # noqa: E402

from distillery.platform.cache.feature_cache import FeatureCache  # noqa: E402
from distillery.platform.cache.job import CacheFeaturesConfig, CacheSettings, run_cache_job  # noqa: E402
from distillery.platform.config.sections import DataConfig, TeacherConfig  # noqa: E402
from distillery.platform.datasets.coco import load_coco  # noqa: E402
from distillery.platform.engine.ingest import JoinAndDecode, annotation_table, build_train_dataset  # noqa: E402
from distillery.platform.datasets.synthetic import generate_synthetic_coco  # noqa: E402
from distillery.platform.engine.launch import configure_ray_data, ordered_ingest_options  # noqa: E402
from distillery.platform.io import storage  # noqa: E402


def reference_dataset(dataset, cache: FeatureCache):
    """The ingest layout before tasks: read_parquet + filter + a decode actor pool."""
    paths = [storage.filesystem(u)[1] for u in cache.shard_uris]
    ds = ray.data.read_parquet(paths, filesystem=storage.pyarrow_filesystem(cache.shard_uris[0]),
                               columns=["image_id", "view", "features", "scale"])
    ds = ds.filter(lambda row: row["view"] == 0)
    return ds.map_batches(JoinAndDecode, fn_constructor_kwargs={
        "table": annotation_table(dataset), "bad_records": "error", "report_uri": None},
        batch_size=16, num_cpus=1, compute=ray.data.ActorPoolStrategy(min_size=1, max_size=2), batch_format="numpy")


def one_epoch(shards, batch_size: int) -> tuple[float, float, int, tuple]:
    """(seconds to the first batch, seconds to the end, rows, each consumer's image ids in the
    order it got them) of one execution over two consumers (``shards``: the dataset's
    ``streaming_split(2)``, made once, as Ray Train does)."""
    start = time.perf_counter()
    first: list[float] = []
    rows = [0, 0]
    ids: list[list[int]] = [[], []]

    def consume(rank: int) -> None:
        for batch in shards[rank].iter_batches(batch_size=batch_size, batch_format="numpy"):
            if not first:
                first.append(time.perf_counter() - start)
            rows[rank] += len(batch["image_id"])
            ids[rank].extend(int(i) for i in batch["image_id"])

    threads = [threading.Thread(target=consume, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return first[0], time.perf_counter() - start, sum(rows), tuple(tuple(r) for r in ids)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--shard-size", type=int, default=8)
    ap.add_argument("--batch", type=int, default=2)
    args = ap.parse_args()
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    configure_ray_data()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        generate_synthetic_coco(root / "data", train=args.images, val=2, size=128, seed=0)
        data = DataConfig(root=str(root / "data"), synthetic=None)
        teacher = TeacherConfig(allow_random_init=True, input_size=128,
                                model_kwargs={"embed_dim": 32, "depth": 1, "num_heads": 2})
        run_cache_job(CacheFeaturesConfig(data=data, teacher=teacher, cache=CacheSettings(
            uri=str(root / "cache"), shard_size=args.shard_size, splits=["train"])))
        annotations, images = data.split_paths("train")
        dataset = load_coco(annotations, images, check_images="none")
        cache = FeatureCache(str(root / "cache" / "train"))
        ordered = build_train_dataset(dataset, cache)
        ordered.context.execution_options = ordered_ingest_options()  # as Ray Train's DataConfig sets it
        pipelines = {"distillery": build_train_dataset(dataset, cache).streaming_split(2, equal=True),
                     "reference": reference_dataset(dataset, cache).streaming_split(2, equal=True),
                     "ordered": ordered.streaming_split(2, equal=True)}
        times: dict[str, list[tuple[float, float, int, tuple]]] = {name: [] for name in pipelines}
        for _ in range(args.epochs):
            for name, shards in pipelines.items():
                times[name].append(one_epoch(shards, args.batch))
    result = {"images": args.images, "epochs": args.epochs, "shard_size": args.shard_size}
    for name, runs in times.items():
        assert all(rows == args.images - args.images % 2 or rows == args.images for _, _, rows, _ in runs), name
        later = runs[1:] or runs
        epoch_s = statistics.median(r[1] for r in later)
        result[name] = {"first_epoch_s": round(runs[0][1], 2),
                        "first_batch_s": round(statistics.median(r[0] for r in later), 3),
                        "epoch_s": round(epoch_s, 3), "images_per_s": round(later[0][2] / epoch_s, 1),
                        # how many epochs handed each consumer other rows, or the same in another order
                        "epochs_unlike_the_first": sum(r[3] != runs[0][3] for r in runs[1:])}
    result["ratio"] = round(result["reference"]["epoch_s"] / result["distillery"]["epoch_s"], 1)
    result["ordered_cost"] = round(result["ordered"]["epoch_s"] / result["distillery"]["epoch_s"], 2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
