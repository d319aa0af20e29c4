"""Training ingest: a Ray Data dataset of (image, annotations[, cached teacher grid]) records.

With a feature cache, the dataset *starts from the cache shards* (``read_parquet``) and joins
each row to its annotations by image id. The annotation table is small (a few MB even for COCO)
so the join is a broadcast join: every decode task holds the table and looks rows up, with no
shuffle. Without a cache the dataset starts from the annotation records.

Images are decoded (full size, RGB uint8) in Ray Data CPU tasks; augmentation happens in the
training worker because its schedule depends on the epoch. A corrupt image follows the data
layer's ``bad_records`` policy: ``error`` fails naming the file; ``skip`` drops the record and
writes one JSON report per skipped image under ``report_uri``, so nothing is dropped silently.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Literal

import numpy as np

from distillery.platform import storage
from distillery.platform.coco import CocoDataset, CorruptImageError, decode_image
from distillery.platform.feature_cache import FeatureCache, decode_features

__all__ = ["build_train_dataset", "rows_to_samples"]

log = logging.getLogger(__name__)


def _annotation_table(dataset: CocoDataset) -> dict[int, dict[str, Any]]:
    table = {}
    for r in dataset.records:
        keep = ~r.iscrowd  # crowd regions are for evaluation, not training targets
        table[r.image_id] = {"uri": r.uri, "boxes": r.boxes[keep].reshape(-1).astype(np.float32),
                             "labels": r.labels[keep].astype(np.int64)}
    return table


class _JoinAndDecode:
    """Ray Data UDF: attach annotations by image id and decode the image bytes."""

    def __init__(self, table: dict[int, dict[str, Any]], bad_records: str, report_uri: str | None):
        self.table = table
        self.bad_records = bad_records
        self.report_uri = report_uri

    def _skip(self, image_id: int, uri: str, reason: str) -> None:
        log.warning("skipping image %s (%s): %s", image_id, uri, reason)
        if self.report_uri:
            storage.write_text(storage.join(self.report_uri, f"{image_id}.json"),
                               json.dumps({"image_id": image_id, "uri": uri, "reason": reason}))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        out: dict[str, list] = {"image_id": [], "image": [], "boxes": [], "labels": []}
        has_features = "features" in batch
        if has_features:
            out["features"], out["scale"] = [], []
        for i, image_id in enumerate(batch["image_id"]):
            image_id = int(image_id)
            ann = self.table.get(image_id)
            if ann is None:  # cache rows of images the dataset no longer has (skipped records)
                continue
            try:
                image = decode_image(storage.read_bytes(ann["uri"]), ann["uri"])
            except (CorruptImageError, FileNotFoundError) as exc:
                if self.bad_records == "error":
                    raise CorruptImageError(f"training image {image_id}: {exc}") from None
                self._skip(image_id, ann["uri"], str(exc))
                continue
            out["image_id"].append(image_id)
            out["image"].append(image)
            out["boxes"].append(ann["boxes"])
            out["labels"].append(ann["labels"])
            if has_features:
                out["features"].append(batch["features"][i])
                out["scale"].append(batch["scale"][i])
        result: dict[str, Any] = {"image_id": np.asarray(out["image_id"], dtype=np.int64)}
        # Ragged columns as object arrays: images differ in size, images in their box counts.
        for key in ("image", "boxes", "labels") + (("features", "scale") if has_features else ()):
            col = np.empty(len(out[key]), dtype=object)
            col[:] = out[key]
            result[key] = col
        return result


def _pyarrow_filesystem(uri: str):
    import pyarrow.fs as pafs

    fs, _ = storage.filesystem(uri)
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs))


def build_train_dataset(dataset: CocoDataset, cache: FeatureCache | None, *,
                        bad_records: Literal["error", "skip"] = "error", report_uri: str | None = None,
                        decode_cpus: float = 1.0):
    """The training dataset: one row per image, with its cached grid when ``cache`` is given."""
    import ray

    table = _annotation_table(dataset)
    if cache is not None:
        cache.check_covers(table)
        uris = cache.shard_uris
        paths = [storage.filesystem(u)[1] for u in uris]
        ds = ray.data.read_parquet(paths, filesystem=_pyarrow_filesystem(uris[0]),
                                   columns=["image_id", "view", "features", "scale"])
        ds = ds.filter(lambda row: row["view"] == 0)
    else:
        ds = ray.data.from_items([{"image_id": iid} for iid in sorted(table)])
    return ds.map_batches(_JoinAndDecode, fn_constructor_kwargs={
        "table": table, "bad_records": bad_records, "report_uri": report_uri},
        batch_size=16, num_cpus=decode_cpus, compute=ray.data.ActorPoolStrategy(min_size=1, max_size=2),
        batch_format="numpy")


def rows_to_samples(batch: dict[str, Any], cache_meta: dict[str, Any] | None):
    """Turn a Ray Data numpy batch into augmentation samples (image CHW uint8, xywh boxes)."""
    import torch

    from distillery.platform.augment import Sample

    samples = []
    for i in range(len(batch["image_id"])):
        image = torch.from_numpy(np.array(batch["image"][i])).permute(2, 0, 1)
        grid = None
        if cache_meta is not None:
            grid = torch.from_numpy(decode_features(batch["features"][i], batch["scale"][i],
                                                    cache_meta["dtype"], cache_meta["grid"]))
        samples.append(Sample.create(image, torch.from_numpy(np.asarray(batch["boxes"][i], dtype=np.float32)),
                                     torch.from_numpy(np.asarray(batch["labels"][i], dtype=np.int64)),
                                     grid=grid, image_id=int(batch["image_id"][i])))
    return samples
