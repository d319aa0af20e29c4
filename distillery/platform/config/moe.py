"""The MoE-tuning job's configuration (``jobs/moe_tune.py``).

Defaults are the *embedded default*: the synthetic dataset; a small open-vocabulary detector
(RT-DETRv4 tiny parts, region-text class head) at 256 px whose dense base is trained briefly in the
same job (``base.dense_steps``, since no dense checkpoint is given); the prompt vocabulary is the
dataset's category names encoded by all-MiniLM-L6-v2 when installed (else the hashing encoder);
then Dynamic-DINO's MoE-tuning with the paper's best split (``copies`` N=16, ``granularity`` k=2,
top-2 routing, aux loss 0.01) on 2 Ray Train workers with expert parallelism ``ep_size=2``
(each worker holds half of every layer's experts), ZeRO stage 0, for 4 epochs.

Keys that matter most:

* ``base.checkpoint``: the dense model to MoE-tune: a ``.safetensors`` / ``.pt`` state dict, a
  checkpoint directory of this job (``model.safetensors`` inside) or of the distillation job
  (its EMA weights; the closed-set class heads are skipped with ``base.strict=false``), a run's
  storage path (its latest checkpoint), or ``models:/<name>@<alias>`` / ``models:/<name>/<version>``
  (the registered version's run artifact ``export/weights.safetensors``). ``None``: train the
  dense base from scratch for ``base.dense_steps`` steps first.
* ``moe.enabled=false`` fine-tunes the dense model instead (the control arm of a comparison).
* ``moe.ep_size``: ranks each layer's experts are spread over; must divide ``copies *
  granularity`` and ``train.num_workers``. ``moe.capacity_factor``: ``None`` drops no token.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from pydantic import Field, PositiveInt, model_validator

from distillery.platform.config.augment import AugmentSettings
from distillery.platform.config.sections import (AdamWSettings, DataConfig, DebugSettings, DeepSpeedSettings, JobConfig,
                                                 OptionalLocalPath, RunOutputSettings, StrictModel, TrackingSettings,
                                                 TrainSettings)
from distillery.students.open_vocab import OPEN_VOCAB_OPTIONS
from distillery.students.rtdetrv4 import STUDENT_SPECS, StudentSpec

__all__ = ["MoETuneConfig"]


class OpenVocabModelSettings(StrictModel):
    """The open-vocabulary detector: RT-DETRv4 student parts ``name`` with a region-text head."""

    name: str = "rtdetrv4_tiny"
    input_size: int = Field(256, ge=64, multiple_of=32)
    # StudentSpec fields (e.g. num_queries, num_decoder_layers) and the head's text_proj_dim,
    # init_logit_scale, prior_prob.
    overrides: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _known(self) -> "OpenVocabModelSettings":
        if self.name not in STUDENT_SPECS:
            raise ValueError(f"model.name {self.name!r} is not an RT-DETRv4 student; expected one of "
                             f"{sorted(STUDENT_SPECS)}")
        allowed = ({f.name for f in dataclasses.fields(StudentSpec)} - {"num_classes", "dsi", "teacher_dim"}) \
            | set(OPEN_VOCAB_OPTIONS)
        unknown = sorted(set(self.overrides) - allowed)
        if unknown:
            raise ValueError(f"model.overrides: unknown key(s) {unknown}; known: {sorted(allowed)}")
        return self

    def decoder_ffn_dim(self) -> int:
        return int(self.overrides.get("decoder_ffn_dim", STUDENT_SPECS[self.name].decoder_ffn_dim))


class TextSettings(StrictModel):
    """Prompt vocabulary and phrase encoder (the embeddings are computed once, on the driver)."""

    encoder: Literal["auto", "minilm", "hashing"] = "auto"
    hashing_dim: PositiveInt = 64  # width of the hashing encoder's vectors
    # A vocabulary file (text, JSON list or COCO categories), one prompt per dataset category in
    # ascending category id; None: the dataset's category names.
    vocabulary: OptionalLocalPath = None
    template: str | None = None  # e.g. "a photo of a {name}"; None: the bare names
    cache_dir: OptionalLocalPath = "runs/phrase_embeddings"  # local directory; None: in memory only


class BaseModelSettings(StrictModel):
    """Where the dense open-vocabulary model comes from."""

    checkpoint: OptionalLocalPath = None  # a models:/ URI is not a path: it stays as it is
    strict: bool = True  # False: skip (and log) checkpoint keys the model lacks and vice versa
    dense_steps: int = Field(300, ge=0)  # dense training steps when checkpoint is None
    checkpoint_every: PositiveInt = 1    # the dense phase's epochs between checkpoints (and its last)
    lr: float = Field(1e-3, gt=0)
    backbone_lr: float = Field(5e-4, gt=0)
    warmup_steps: int = Field(20, ge=0)


class MoESettings(StrictModel):
    enabled: bool = True
    copies: PositiveInt = 16        # N: copies of each decoder FFN
    granularity: PositiveInt = 2    # k: pieces per copy; E = N * k experts, top-k routing
    ep_size: PositiveInt = 2        # expert-parallel ranks per layer
    capacity_factor: float | None = Field(None, gt=0)       # training; None: drop no token
    eval_capacity_factor: float | None = Field(None, gt=0)  # evaluation and analysis
    aux_loss_weight: float = Field(0.01, ge=0)
    # None: Dynamic-DINO's gate (step-0 exact) unless DeepSpeed's own is exact (a single expert).
    use_our_gate: bool | None = None

    @property
    def num_experts(self) -> int:
        return self.copies * self.granularity


class MoEOptimSettings(AdamWSettings):
    """AdamW of the fine-tuning (MoE or dense) phase; its flat part is a share of the steps."""

    flat_fraction: float = Field(0.5, ge=0, le=1)  # share of the steps at the full rate


class MoETrainSettings(TrainSettings):
    """The shared train section (workers, checkpoints, seed, ...) plus MoE-tuning's own."""

    steps_per_epoch: PositiveInt | None = None  # None: one pass over the train split
    flip_prob: float = Field(0.5, ge=0, le=1)
    probe_images: PositiveInt = 2  # val images whose raw outputs every checkpoint records

    def augment(self) -> AugmentSettings:
        """Fine-tuning augments with horizontal flips only."""
        return AugmentSettings.flips_only(self.flip_prob)


class AnalysisSettings(StrictModel):
    """Expert analysis on the val split (per decoder layer), from the routing of every evaluation."""

    enabled: bool = True
    # A partner of expert a is "stable" when it joins more than this share of a's activations.
    stable_threshold: float = Field(0.2, gt=0, lt=1)


class MoETuneConfig(JobConfig):
    data: DataConfig = Field(default_factory=DataConfig)
    model: OpenVocabModelSettings = Field(default_factory=OpenVocabModelSettings)
    text: TextSettings = Field(default_factory=TextSettings)
    base: BaseModelSettings = Field(default_factory=BaseModelSettings)
    moe: MoESettings = Field(default_factory=MoESettings)
    optim: MoEOptimSettings = Field(
        default_factory=lambda: MoEOptimSettings(lr=2e-4, backbone_lr=1e-4, warmup_steps=10))
    deepspeed: DeepSpeedSettings = Field(default_factory=DeepSpeedSettings)
    train: MoETrainSettings = Field(default_factory=lambda: MoETrainSettings(epochs=4))
    analysis: AnalysisSettings = Field(default_factory=AnalysisSettings)
    tracking: TrackingSettings = Field(default_factory=lambda: TrackingSettings(experiment="distillery-moe"))
    output: RunOutputSettings = Field(default_factory=lambda: RunOutputSettings(storage_path="runs/moe_tune"))
    debug: DebugSettings = Field(default_factory=DebugSettings)

    @model_validator(mode="after")
    def _experts_fit(self) -> "MoETuneConfig":
        m = self.moe
        if not m.enabled:
            return self
        width = self.model.decoder_ffn_dim()
        if width % m.granularity:
            raise ValueError(f"moe.granularity ({m.granularity}) must divide the decoder FFN width {width} "
                             f"of model {self.model.name!r}")
        if m.num_experts % m.ep_size:
            raise ValueError(f"moe.ep_size ({m.ep_size}) must divide the number of experts per layer "
                             f"moe.copies * moe.granularity = {m.num_experts}")
        if self.train.num_workers % m.ep_size:
            raise ValueError(f"moe.ep_size ({m.ep_size}) must divide train.num_workers ({self.train.num_workers}): "
                             "every expert-parallel group is made of whole workers")
        return self

    @model_validator(mode="after")
    def _has_a_base(self) -> "MoETuneConfig":
        if self.base.checkpoint is None and self.base.dense_steps == 0:
            raise ValueError("base.checkpoint is not set and base.dense_steps is 0: there is no dense model to "
                             "tune (give a checkpoint, or dense_steps > 0 to train one first)")
        return self
