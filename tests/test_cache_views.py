"""Cached views (``cache.views: K``): deterministic pre-augmented views, exact replay in the
training ingest, per-epoch view sampling, K=1 unchanged, and K mismatches refused."""

import json

import numpy as np
import pytest
import torch

from distillery.data import augment as A, sample as S, transforms as T, views as V
from distillery.platform.io import storage
from distillery.platform.cache.job import CacheFeaturesConfig, ViewRecipe, build_teacher, run_cache_job
from distillery.platform.config.augment import runtime_augment_config
from distillery.platform.datasets.coco import decode_image, load_coco, load_image_resized
from distillery.platform.config.sections import load_config
from distillery.platform.config.distill import DistillConfig
from distillery.platform.cache.feature_cache import CacheError, FeatureCache, FeatureCacheWriter, plan_shards
from distillery.platform.engine.ingest import build_train_dataset, rows_to_samples, select_view

TINY_TEACHER = ["teacher.allow_random_init=true", "teacher.input_size=128",
                "teacher.model_kwargs={embed_dim: 32, depth: 1, num_heads: 2}"]
K = 3


def job_config(synthetic_data, cache_uri, *extra):
    return load_config(CacheFeaturesConfig, None, [
        f"data.root={synthetic_data}", f"cache.uri={cache_uri}", "cache.shard_size=8", *TINY_TEACHER, *extra])


def train_split(root):
    return load_coco(str(root / "annotations" / "instances_train.json"), str(root / "images" / "train"))


def decoded(record):
    """The training ingest's decoded image: (3, H, W) uint8 over an HWC array."""
    return torch.from_numpy(decode_image(storage.read_bytes(record.uri), record.uri)).permute(2, 0, 1)


def run_teacher(teacher, image):
    with torch.no_grad():
        return teacher(image[None].float() / 255.0)[0].numpy()


def close_fp16(cached, online):
    """fp16 storage of the grid: relative error well under 1% of the grid's range."""
    return np.abs(cached - online).max() < 1e-2 * np.abs(online).max()


@pytest.fixture(scope="module")
def view_cache(ray_local, synthetic_data, tmp_path_factory):
    cfg = job_config(synthetic_data, tmp_path_factory.mktemp("views") / "cache", f"cache.views={K}")
    summary = run_cache_job(cfg)["train"]
    teacher = build_teacher(cfg.teacher.model_dump(), "float32")
    return cfg, summary, FeatureCache(summary["uri"], expected_fingerprint=teacher.fingerprint), teacher


def test_views_are_deterministic(synthetic_data):
    record = train_split(synthetic_data).records[3]
    image, boxes = decoded(record), torch.from_numpy(record.boxes)
    cfg = A.AugmentConfig(size=128)
    a = V.make_views(image, boxes, record.image_id, 6, seed=0, cfg=cfg)
    b = V.make_views(image, boxes, record.image_id, 6, seed=0, cfg=cfg)
    assert [p for _, p in a] == [p for _, p in b]
    assert all(torch.equal(x, y) for (x, _), (y, _) in zip(a, b))
    # View k is the same whichever K the cache has; another seed draws other views.
    assert all(torch.equal(x, y) and p == q for (x, p), (y, q) in zip(a[:3], V.make_views(image, boxes, record.image_id,
                                                                                            3, seed=0, cfg=cfg)))
    other = V.make_views(image, boxes, record.image_id, 6, seed=1, cfg=cfg)
    assert [p for _, p in other][1:] != [p for _, p in a][1:]
    # The views are real augmentations: not all equal to the plain image, all at the teacher size.
    assert any(not torch.equal(x, a[0][0]) for x, _ in a[1:]) and all(x.shape == (3, 128, 128) for x, _ in a)
    # View 0 is the plain resized image, exactly what a cache without views feeds the teacher.
    assert np.array_equal(a[0][0].numpy(), load_image_resized(record.uri, 128))


def test_view_params_follow_the_recipe_and_replay_its_ops(synthetic_data):
    record = train_split(synthetic_data).records[5]
    image, boxes = decoded(record), torch.from_numpy(record.boxes)
    plain = S.Sample.create(image, boxes, torch.from_numpy(record.labels))
    cfg = A.AugmentConfig(size=96, photometric_prob=0.5, iou_crop_prob=0.8, flip_prob=0.25)
    draws = [V.draw_view_params(plain.size, plain.boxes, cfg, V.view_rng(0, record.image_id, v)) for v in range(1, 801)]
    rate = {key: np.mean([d[key] is not None and d[key] is not False for d in draws])
            for key in ("photometric", "zoom_out", "crop", "flip")}
    # The recipe's probabilities (an IoU crop is tried with p=0.8 but often finds no crop that
    # meets its IoU draw, exactly as in the Augmenter).
    assert abs(rate["photometric"] - 0.5) < 0.06 and abs(rate["zoom_out"] - 0.5) < 0.06
    assert abs(rate["flip"] - 0.25) < 0.05 and 0.15 < rate["crop"] < 0.8
    assert all(1.0 <= d["zoom_out"]["ratio"] <= 4.0 for d in draws if d["zoom_out"])
    # Replay = the Augmenter's ops in the Augmenter's order, with these parameters.
    d = next(d for d in draws if d["photometric"] and d["zoom_out"] and d["crop"] and d["flip"])
    z = d["zoom_out"]
    expected = T.photometric_with(plain, d["photometric"])
    expected = T.sanitize(T.crop(T.zoom_out(expected, z["ratio"], z["left"], z["top"], z["fill"]), *d["crop"]))
    expected = T.sanitize(T.resize(T.hflip(expected), (96, 96)))
    got = V.apply_view(plain, json.loads(json.dumps(d)), view=2)  # params survive their JSON form
    assert got.view == 2 and torch.equal(got.image, expected.image) and torch.equal(got.boxes, expected.boxes)
    assert not torch.equal(got.image, V.apply_view(plain, dict(d, flip=False)).image)
    with pytest.raises(ValueError, match="dataset changed"):
        V.apply_view(T.resize(plain, (50, 60)), d)


def test_cache_job_views_are_deterministic_and_described(view_cache, synthetic_data, tmp_path):
    cfg, summary, cache, _ = view_cache
    assert summary["views"] == K and summary["images"] == 24 and summary["teacher_forwards"] == 24 * K
    m = cache.manifest
    assert m["views"] == K and m["count"] == 24 and m["view_seed"] == 0
    assert m["view_recipe"] == V.view_recipe(runtime_augment_config(ViewRecipe(), 128))
    cache.verify()
    cache.check_covers(train_split(synthetic_data).image_ids)
    # A rebuild with the same seed gives the same shards, byte for byte (grids and params).
    again = run_cache_job(job_config(synthetic_data, tmp_path / "again", f"cache.views={K}"))["train"]
    assert [s["sha256"] for s in FeatureCache(again["uri"]).manifest["shards"]] == [s["sha256"] for s in m["shards"]]


def test_replayed_params_give_the_image_the_teacher_saw(view_cache, synthetic_data):
    cfg, _, cache, teacher = view_cache
    aug_cfg = runtime_augment_config(cfg.cache.view_recipe, 128)
    augmented = 0
    for record in train_split(synthetic_data).records[:8]:
        image = decoded(record)
        boxes = torch.from_numpy(record.boxes[~record.iscrowd])
        rendered = V.make_views(image, boxes, record.image_id, K, seed=0, cfg=aug_cfg)
        for v in range(K):
            params = cache.params(record.image_id, v)
            replay = V.apply_view(S.Sample.create(image, boxes, torch.zeros(len(boxes))), params, v)
            assert torch.equal(replay.image, rendered[v][0])  # the pixels the cache job rendered
            assert close_fp16(cache.get(record.image_id, v), run_teacher(teacher, replay.image))
            b = replay.boxes
            assert ((b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])).all() and b.min() >= 0 and b.max() <= 128
            augmented += v > 0 and not torch.equal(replay.image, rendered[0][0])
    assert augmented >= 8  # most of the 16 non-plain views really changed the image


def test_ingest_samples_views_per_epoch_and_replays_them(view_cache, synthetic_data):
    _, _, cache, teacher = view_cache
    ds = build_train_dataset(train_split(synthetic_data), cache)
    batches = list(ds.iter_batches(batch_size=6, batch_format="numpy"))
    assert sum(len(b["image_id"]) for b in batches) == 24 and "params" in batches[0]
    meta = {"dtype": cache.dtype, "grid": list(cache.grid), "views": K, "uri": cache.uri}
    used: dict[int, list[int]] = {}
    aug = A.Augmenter(A.AugmentConfig(size=128, policy_epochs=(0, 0, 10), mosaic_prob=0.0), seed=0)
    for epoch in range(K):
        for batch in batches:
            for s in rows_to_samples(batch, meta, view_epoch=epoch, seed=5):
                used.setdefault(s.image_id, []).append(s.view)
                assert s.view == select_view(5, epoch, s.image_id, K)
                if s.view == 0:
                    continue
                grid = s.layers[0].grid.numpy()
                assert np.array_equal(grid, cache.get(s.image_id, s.view))
                assert close_fp16(grid, run_teacher(teacher, s.image))  # exact grid of this very image
                # The online augmenter leaves a view's image alone (no Mosaic here), so the
                # grid the student is trained against is the cached one, not resampled.
                out = aug(s, epoch=1)
                rendered, mask = S.render_features(out, tuple(cache.grid[1:]))
                assert torch.equal(out.image, s.image) and mask.all()
                assert torch.allclose(rendered, s.layers[0].grid, atol=1e-5)
    # K consecutive epochs use every view of every image once.
    assert len(used) == 24 and all(sorted(v) == list(range(K)) for v in used.values())
    # Outside the strong epochs (view_epoch None): the plain image with view 0's grid.
    plain = rows_to_samples(batches[0], meta)
    assert all(s.view == 0 and np.array_equal(s.layers[0].grid.numpy(), cache.get(s.image_id)) for s in plain)


def test_epoch_sampling_covers_views_and_is_rank_and_restart_deterministic():
    ids = list(range(100, 160))
    for k in (2, 4, 8):
        for block in range(3):
            for iid in ids:
                assert sorted(select_view(7, block * k + e, iid, k) for e in range(k)) == list(range(k))
    first = [[select_view(7, e, iid, 4) for iid in ids] for e in range(12)]
    assert first == [[select_view(7, e, iid, 4) for iid in ids] for e in range(12)]  # a restart agrees
    assert first != [[select_view(8, e, iid, 4) for iid in ids] for e in range(12)]  # the seed matters
    assert len({tuple(select_view(7, e, iid, 4) for e in range(4)) for iid in ids}) > 6  # orders differ
    counts = np.bincount(np.asarray(first).ravel(), minlength=4)
    assert counts.min() == counts.max() == 12 * len(ids) // 4
    assert select_view(7, 3, 100, 1) == 0
    with pytest.raises(ValueError, match="epoch must be >= 0"):
        select_view(7, -1, 100, 4)
    # Rank independence: the view depends on the image, not on which rank or batch it lands in.
    grid = np.zeros((2, 1, 1), dtype=np.float16)
    batch = {"image_id": np.array(ids[:4]), "image": [np.zeros((8, 8, 3), np.uint8)] * 4,
             "boxes": [np.zeros(0, np.float32)] * 4, "labels": [np.zeros(0, np.int64)] * 4,
             "features": [grid.tobytes() * 4] * 4, "scale": [None] * 4,
             "params": [json.dumps([{"source_hw": [8, 8], "size": 8, "photometric": None, "zoom_out": None,
                                     "crop": None, "flip": True}] * 4)] * 4}
    meta = {"dtype": "fp16", "grid": [2, 1, 1]}
    whole = {s.image_id: s.view for s in rows_to_samples(batch, meta, view_epoch=5, seed=7)}
    halves = {}
    for part in ([3, 1], [0, 2]):  # another split of the same images over two "ranks"
        sub = {k: [v[i] for i in part] if k != "image_id" else v[part] for k, v in batch.items()}
        halves.update({s.image_id: s.view for s in rows_to_samples(sub, meta, view_epoch=5, seed=7)})
    assert whole == halves == {iid: select_view(7, 5, iid, 4) for iid in ids[:4]}


def test_k1_cache_and_ingest_unchanged(tmp_path):
    fp = {"model": "tiny", "weights_sha256": "abc", "input_size": 64, "dtype": "float32"}
    grid = [8, 2, 2]
    writer = FeatureCacheWriter(str(tmp_path / "c"), fp, grid, "fp16", 2, {"annotation_sha256": "d"})
    shards = plan_shards([1, 2, 3], 2)
    writer.begin(shards)
    feats = np.random.default_rng(0).normal(size=(3, *grid)).astype(np.float32)
    infos = [writer.write_shard(0, shards[0], feats[:2]), writer.write_shard(1, shards[1], feats[2:])]
    manifest = writer.finalize(2, infos)
    plan = json.loads((tmp_path / "c" / "plan.json").read_text())
    # The plan and manifest of a K=1 cache have exactly the keys they had before views existed.
    assert set(plan) == {"format_version", "fingerprint_digest", "dtype", "grid", "shard_size", "views",
                         "num_shards", "image_ids_sha256", "dataset"} and plan["views"] == 1
    assert set(manifest) == {"format_version", "fingerprint", "fingerprint_digest", "grid", "dtype", "views",
                             "shard_size", "count", "dataset", "shards"} and manifest["count"] == 3
    cache = FeatureCache(str(tmp_path / "c"))
    assert cache.views == 1 and cache.params(2, 0) is None
    cache.check_views(1, recipe={"anything": 1})  # no views: no recipe to agree with
    with pytest.raises(CacheError, match="view 1 is out of range"):
        cache.get(2, view=1)
    # A K=1 row (no params column) ignores the epoch: the plain image and its grid, as before.
    enc = np.ascontiguousarray(feats[0].reshape(8, -1).T).astype(np.float16).tobytes()
    batch = {"image_id": np.array([1]), "image": [np.full((4, 6, 3), 9, np.uint8)], "boxes": [np.array([1, 1, 2, 2], np.float32)],
             "labels": [np.array([1])], "features": [enc], "scale": [None]}
    meta = {"dtype": "fp16", "grid": grid}
    a, b = rows_to_samples(batch, meta), rows_to_samples(batch, meta, view_epoch=3, seed=1)
    for x, y in zip(a, b):
        assert x.view == y.view == 0 and torch.equal(x.image, y.image) and torch.equal(x.boxes, y.boxes)
        assert torch.equal(x.layers[0].grid, y.layers[0].grid) and torch.equal(x.layers[0].to_source, torch.eye(3))


def test_views_mismatch_is_a_clear_error(view_cache, synthetic_data):
    cfg, summary, cache, _ = view_cache
    uri = summary["uri"]
    with pytest.raises(CacheError, match=f"feature cache {uri} has {K} view\\(s\\) per image but cache.views=1"):
        cache.check_views(1)
    recipe = V.view_recipe(runtime_augment_config(ViewRecipe(flip_prob=0.3), 128))
    with pytest.raises(CacheError, match=f"{uri}: its views were drawn with another .*fields differ: flip_prob"):
        cache.check_views(K, recipe)
    # The cache job refuses to resume (or extend) a cache URI with another K.
    with pytest.raises(CacheError, match=f"cache {uri} was started with a different plan .*views"):
        run_cache_job(job_config(synthetic_data, cfg.cache.uri, "cache.views=2"))
    # The training worker checks cache.views (and the augment recipe) before its first step.
    from distillery.platform.distill.teacher_signal import teacher_signal

    def distill_cfg(*extra):
        return load_config(DistillConfig, None, [f"cache.uri={cfg.cache.uri}", *extra])

    def _check_cache_views(job_cfg, augment):
        return teacher_signal(job_cfg).cache_views(augment)

    aug_cfg = A.AugmentConfig(size=128)
    assert _check_cache_views(distill_cfg(f"cache.views={K}"), aug_cfg) == K
    with pytest.raises(CacheError, match=f"feature cache {uri} has {K} view"):
        _check_cache_views(distill_cfg("cache.views=1"), aug_cfg)
    with pytest.raises(CacheError, match="fields differ: photometric_prob"):
        _check_cache_views(distill_cfg(f"cache.views={K}"), A.AugmentConfig(size=128, photometric_prob=0.2))
    assert _check_cache_views(distill_cfg("teacher_mode=none"), aug_cfg) == 1
