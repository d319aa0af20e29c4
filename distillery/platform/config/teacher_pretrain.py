"""The teacher-pretraining job's configuration (``jobs/pretrain_teacher.py``).

Its keys mirror where the distillation and cache jobs keep the same settings, so that the file this
job builds is the one they reuse: ``data_root`` is their ``data.root``, ``input_size`` / ``pool`` their
``teacher.input_size`` / ``teacher.pool``, ``domain`` their ``teacher.domain``. The embedded default
builds the embedded defaults' domain teacher (256 px pooled to 128, an 8x8 grid) and probes it.
"""

from __future__ import annotations

from pydantic import Field, PositiveInt

from distillery.platform.config.sections import DomainTeacherSettings, LocalPath, StrictModel

__all__ = ["PretrainTeacherConfig", "TeacherProbeSettings"]


class TeacherProbeSettings(StrictModel):
    """The linear probe run after the build (domain vs random teacher, balanced accuracy)."""

    enabled: bool = True
    seed: int = 2000  # the probe images' own seed: disjoint from the pool and the student's data
    train_images: PositiveInt = 200
    test_images: PositiveInt = 200
    steps: PositiveInt = 300


class PretrainTeacherConfig(StrictModel):
    data_root: LocalPath = "runs/data/synthetic"
    input_size: int = Field(256, ge=32)
    pool: int = Field(2, ge=1)
    domain: DomainTeacherSettings = Field(default_factory=DomainTeacherSettings)
    probe: TeacherProbeSettings = Field(default_factory=TeacherProbeSettings)
