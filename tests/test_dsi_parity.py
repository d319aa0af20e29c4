"""Cached vs online teacher: on an unaugmented batch the DSI loss from the cache equals the DSI
loss from running the teacher on the training batch (up to fp16 storage)."""

import numpy as np
import torch

from distillery.platform import augment as A
from distillery.platform import storage
from distillery.platform.coco import decode_image, load_coco, load_image_resized
from distillery.platform.feature_cache import FeatureCache, FeatureCacheWriter, plan_shards
from distillery.students import build_student, dsi_loss
from distillery.teachers import DinoV3Teacher


def test_cached_and_online_dsi_loss_agree(synthetic_data, tmp_path):
    size = 128
    teacher = DinoV3Teacher(allow_random_init=True, input_size=size,
                            model_kwargs={"embed_dim": 32, "depth": 1, "num_heads": 2})
    ds = load_coco(str(synthetic_data / "annotations" / "instances_train.json"),
                   str(synthetic_data / "images" / "train"))
    records = ds.records[:4]
    # The cache side, as the cache job writes it: resized image -> teacher -> fp16 shard.
    writer = FeatureCacheWriter(str(tmp_path / "c"), teacher.fingerprint, [32, 4, 4], "fp16", 8, {})
    ids = [r.image_id for r in records]
    writer.begin(plan_shards(ids, 8))
    images = torch.stack([torch.from_numpy(load_image_resized(r.uri, size)) for r in records]).float() / 255
    info = writer.write_shard(0, ids, teacher(images).numpy())
    writer.finalize(1, [info])
    cache = FeatureCache(str(tmp_path / "c"), expected_fingerprint=teacher.fingerprint)

    # The training side: full-size decode -> Sample with the cached grid -> resize -> collate.
    samples = []
    for r in records:
        img = torch.from_numpy(decode_image(storage.read_bytes(r.uri), r.uri)).permute(2, 0, 1)
        samples.append(A.resize(A.Sample.create(img, torch.from_numpy(r.boxes), torch.from_numpy(r.labels),
                                                grid=torch.from_numpy(cache.get(r.image_id))), (size, size)))
    batch = A.collate(samples, f5_hw=(size // 32, size // 32))
    assert torch.equal(batch["images"], images)  # the student sees exactly what the teacher saw
    online = teacher(batch["images"])

    student = build_student("rtdetrv4_tiny", num_classes=6, eval_spatial_size=size, teacher_dim=32).train()
    f5 = student(batch["images"], [{"labels": t["labels"], "boxes": t["boxes"]} for t in batch["targets"]])["f5"]
    cached_loss = dsi_loss(f5, batch["teacher_grid"], student.dsi, mask=batch["teacher_mask"])
    online_loss = dsi_loss(f5, online, student.dsi)
    assert batch["teacher_mask"].all()
    assert abs(cached_loss.item() - online_loss.item()) < 1e-3, (cached_loss.item(), online_loss.item())
    cos = torch.nn.functional.cosine_similarity(batch["teacher_grid"], online, dim=1)
    assert cos.min() > 0.999
    assert np.isfinite(cached_loss.item())
