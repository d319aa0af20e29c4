"""The domain teacher: a DINOv3 ViT trained on a synthetic pool disjoint from every student image,
built on first use, kept beside the synthetic dataset, loaded like Meta's own file.

:func:`ensure_domain_teacher` returns the teacher's file, building it when it is absent:

1. the pool: ``images`` synthetic images of their own seed (stream ``(seed, 0)`` of
   :func:`~distillery.platform.datasets.synthetic.synthetic_images`; the student's splits are
   streams ``(data seed, 0/1)``, seed 0 by default), drawn at the teacher's input size, with
   per-patch classes from their boxes (:func:`~distillery.teachers.dense_pretrain.patch_labels_from_boxes`);
2. training (plain PyTorch, one process: :func:`~distillery.teachers.dense_pretrain.train_dense_teacher`;
   why dense supervision rather than DINO/iBOT is said there);
3. the weights in Meta's DINOv3 checkpoint layout
   (:func:`~distillery.teachers.dinov3_weights.to_meta_state_dict`), written atomically to
   ``<data root>/teacher/dinov3_domain_<settings hash>.pth``, with ``<same>.json`` beside it saying how
   it was made. ``teacher.weights`` loads it exactly as it loads Meta's file; its fingerprint is the
   file's sha256.

A second call with the same settings reuses the file; concurrent callers on one machine wait for
the first one (a lock file). The settings hash covers everything that changes the weights.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from distillery.platform.datasets.synthetic import SYNTHETIC_CATEGORIES, synthetic_images
from distillery.platform.io import storage
from distillery.teachers.dense_pretrain import DensePretrainSettings, patch_labels_from_boxes, train_dense_teacher
from distillery.teachers.dinov3 import build_dinov3_vit
from distillery.teachers.dinov3_weights import sha256_file, to_meta_state_dict

__all__ = ["DOMAIN_MODEL_KWARGS", "DOMAIN_MODEL_NAME", "DomainTeacher", "ensure_domain_teacher", "synthetic_pool"]

log = logging.getLogger(__name__)

DOMAIN_MODEL_NAME = "vit_small_patch16_dinov3"
# 6 blocks of width 192 (3 heads of 64): trains in minutes on 2 CPU cores; register tokens and RoPE as
# the architecture has them.
DOMAIN_MODEL_KWARGS: dict[str, int] = {"embed_dim": 192, "depth": 6, "num_heads": 3}
# Bumped when the recipe changes in a way the settings do not show (labels, loss, schedule).
_RECIPE_VERSION = 1
NUM_CLASSES = len(SYNTHETIC_CATEGORIES) + 1  # + background


@dataclass(frozen=True)
class DomainTeacher:
    """A built domain teacher: its Meta-layout file and how to wrap it in ``DinoV3Teacher``."""

    weights: str
    model_name: str
    model_kwargs: dict[str, Any]
    input_size: int
    pool: int
    settings: dict[str, Any] = field(default_factory=dict)
    built: bool = False            # True when this call trained it, False when the file was reused
    seconds: float = 0.0           # this call's wall time (pool + training + writing, or the reuse check)

    def teacher_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of :class:`~distillery.teachers.dinov3.DinoV3Teacher` for this teacher."""
        return {"model_name": self.model_name, "weights": self.weights, "input_size": self.input_size,
                "pool": self.pool, "model_kwargs": dict(self.model_kwargs)}


def synthetic_pool(count: int, image_size: int, seed: int, stream: int = 0, *, grid: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` synthetic images of stream ``(seed, stream)`` as (N, 3, S, S) uint8 (decoded from
    their JPEG bytes, as the student sees them), with (N, grid, grid) per-patch classes: 0 background,
    1.. the synthetic categories in :data:`SYNTHETIC_CATEGORIES` order."""
    index_of = {c.id: i + 1 for i, c in enumerate(SYNTHETIC_CATEGORIES)}
    images = torch.empty((count, 3, image_size, image_size), dtype=torch.uint8)
    boxes = []
    for i, (jpeg, anns) in enumerate(synthetic_images(count, image_size, seed, stream)):
        rgb = np.array(Image.open(io.BytesIO(jpeg)).convert("RGB"))  # a writable copy
        images[i] = torch.from_numpy(rgb).permute(2, 0, 1)
        boxes.append([(index_of[cat], (x, y, x + w, y + h)) for cat, (x, y, w, h) in anns])
    return images, patch_labels_from_boxes(boxes, image_size, grid)


def _settings(image_size: int, seed: int, images: int, steps: int, batch_size: int, lr: float, pool: int,
              model_name: str, model_kwargs: dict[str, Any]) -> dict[str, Any]:
    return {"recipe_version": _RECIPE_VERSION, "objective": "dense per-patch class (synthetic pool boxes)",
            "model_name": model_name, "model_kwargs": dict(sorted(model_kwargs.items())),
            "image_size": image_size, "pool": pool, "seed": seed, "images": images, "steps": steps,
            "batch_size": batch_size, "lr": lr, "num_classes": NUM_CLASSES}


@contextlib.contextmanager
def _build_lock(path: Path) -> Iterator[None]:
    """One builder per file on this machine; the others wait, then find the file."""
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure_domain_teacher(data_root: str, *, image_size: int, seed: int = 1000, images: int = 1500,
                          steps: int = 600, batch_size: int = 16, lr: float = 1e-3, pool: int = 2,
                          model_name: str = DOMAIN_MODEL_NAME, model_kwargs: dict[str, Any] | None = None
                          ) -> DomainTeacher:
    """The domain teacher for images of ``image_size`` px (the teacher's input, pooled by ``pool``),
    built under ``<data_root>/teacher/`` on first use and reused after (see the module docstring).

    ``seed`` is the pool's seed (keep it apart from the student dataset's, 0 by default) and the
    training's; ``images`` the pool size, ``steps`` / ``batch_size`` / ``lr`` the training's.
    ``data_root`` must be a local directory: the file is read back with ``torch.load``.
    """
    t0 = time.perf_counter()
    if storage.has_protocol(data_root):
        raise ValueError(f"the domain teacher is kept beside the synthetic dataset, which must be a local "
                         f"directory for it; data root {data_root!r} is remote: give teacher.weights instead")
    kwargs = dict(DOMAIN_MODEL_KWARGS if model_kwargs is None else model_kwargs)
    settings = _settings(int(image_size), int(seed), int(images), int(steps), int(batch_size), float(lr), int(pool),
                         model_name, kwargs)
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    folder = Path(data_root).expanduser().resolve() / "teacher"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"dinov3_domain_{digest}.pth"
    with _build_lock(folder / f".dinov3_domain_{digest}.lock"):
        built = not path.is_file()
        if built:
            _build(path, settings)
        else:
            log.info("domain teacher: reusing %s", path)
    return DomainTeacher(weights=str(path), model_name=model_name, model_kwargs=kwargs, input_size=int(image_size),
                         pool=int(pool), settings=settings, built=built, seconds=round(time.perf_counter() - t0, 2))


def _build(path: Path, settings: dict[str, Any]) -> None:
    t0, cpu0 = time.perf_counter(), time.process_time()
    size, pool = settings["image_size"], settings["pool"]
    patch = int(build_dinov3_vit(settings["model_name"], settings["model_kwargs"]).patch_embed.patch_size[0])
    if size % (pool * patch):
        raise ValueError(f"domain teacher: image size {size} / pool {pool} must be a multiple of the patch size "
                         f"{patch}")
    grid = size // pool // patch
    log.info("domain teacher: building %s (%d synthetic images of seed %d at %d px, %d steps; a one-off of "
             "about 2 minutes on 2 CPU cores)", path, settings["images"], settings["seed"], size, settings["steps"])
    pool_images, labels = synthetic_pool(settings["images"], size, settings["seed"], grid=grid)
    pool_seconds = time.perf_counter() - t0
    train = DensePretrainSettings(steps=settings["steps"], batch_size=settings["batch_size"], lr=settings["lr"],
                                  seed=settings["seed"])
    result = train_dense_teacher(pool_images, labels, settings["num_classes"], model_name=settings["model_name"],
                                 model_kwargs=settings["model_kwargs"], pool=pool, settings=train,
                                 on_log=lambda row: log.info("domain teacher: step %d/%d loss %.3f patch accuracy "
                                                             "%.3f", row["step"], train.steps, row["loss"],
                                                             row["patch_accuracy"]))
    buffer = io.BytesIO()
    torch.save(to_meta_state_dict(result.model), buffer)
    storage.write_bytes(str(path), buffer.getvalue())
    made = {"weights": path.name, "sha256": sha256_file(path), "layout": "meta (DINOv3 official keys)",
            "settings": settings, "training": asdict(train), "pool_seconds": round(pool_seconds, 1),
            "train_seconds": round(result.seconds, 1), "seconds": round(time.perf_counter() - t0, 1),
            "cpu_seconds": round(time.process_time() - cpu0, 1),
            "last_log": result.history[-1] if result.history else {}, "threads": torch.get_num_threads(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    storage.write_text(str(path.with_suffix(".json")), json.dumps(made, indent=1))
    log.info("domain teacher: wrote %s in %.0f s (pool %.0f s, training %.0f s)", path, made["seconds"],
             pool_seconds, result.seconds)
