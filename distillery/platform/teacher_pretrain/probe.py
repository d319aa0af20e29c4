"""Do the domain teacher's features carry the domain? A linear probe against the random teacher.

Both teachers have the same architecture (the random one is the domain teacher's initialisation
seed, untrained); each one's frozen patch features of the same probe images go through the same
probe (:func:`~distillery.teachers.dense_pretrain.linear_probe`): a linear classifier of the
per-patch class, background included, trained on one set of images and scored by balanced
accuracy on another. Both sets are drawn from a seed of their own (streams ``(seed, 0)`` and
``(seed, 1)``), so neither shares an image with the teacher's pool or the student's splits.
"""

from __future__ import annotations

import time
import warnings
from typing import Any

from distillery.platform.teacher_pretrain.domain import NUM_CLASSES, DomainTeacher, synthetic_pool
from distillery.teachers import DinoV3Teacher
from distillery.teachers.dense_pretrain import linear_probe, teacher_features

__all__ = ["probe_domain_teacher"]


def probe_domain_teacher(domain: DomainTeacher, *, seed: int = 2000, train_images: int = 200,
                         test_images: int = 200, steps: int = 300) -> dict[str, Any]:
    """``{"domain": {...}, "random": {...}, "probe": {...}}``: each teacher's ``balanced_accuracy``
    (held-out images), ``train_balanced_accuracy`` and ``accuracy``; the probe's settings and seconds."""
    t0 = time.perf_counter()
    if seed == domain.settings.get("seed"):
        raise ValueError(f"probe seed {seed} is the domain teacher's pool seed: the probe images must be held out")
    trained = DinoV3Teacher(**domain.teacher_kwargs())
    with warnings.catch_warnings():  # the random teacher is the point of comparison here, not an accident
        warnings.filterwarnings("ignore", message=".*RANDOMLY INITIALISED.*")
        random = DinoV3Teacher(model_name=domain.model_name, model_kwargs=domain.model_kwargs,
                               allow_random_init=True, seed=int(domain.settings.get("seed", 0)),
                               input_size=domain.input_size, pool=domain.pool)
    grid = trained.grid_size[0]
    train_x, train_y = synthetic_pool(train_images, domain.input_size, seed, 0, grid=grid)
    test_x, test_y = synthetic_pool(test_images, domain.input_size, seed, 1, grid=grid)
    out: dict[str, Any] = {}
    for name, teacher in (("domain", trained), ("random", random)):
        out[name] = linear_probe(teacher_features(teacher, train_x), train_y, teacher_features(teacher, test_x),
                                 test_y, NUM_CLASSES, steps=steps)
    out["probe"] = {"seed": seed, "train_images": train_images, "test_images": test_images, "steps": steps,
                    "grid": grid, "classes": NUM_CLASSES, "seconds": round(time.perf_counter() - t0, 1)}
    return out
