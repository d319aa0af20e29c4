"""The MoE-tuning job's spec: its kind (spelled here alone), its run description, its checkpoint
record and file names, and where its worker-side job and its driver live.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from distillery.platform.config.moe import MoETuneConfig
from distillery.platform.engine.checkpoints import CheckpointRecord
from distillery.platform.engine.run_spec import RunDescription
from distillery.platform.engine.spec import JobSpec

__all__ = ["ANALYSIS_JSON", "BASE_DIR", "DENSE_BASE_DIR", "DENSE_PHASE", "MODEL_FILE", "PROBE_FILE", "SPEC",
           "MoETuneRecord", "MoETuneRun"]

# The job's files in a checkpoint directory (beside the engine's).
MODEL_FILE = "model.safetensors"          # consolidated weights (plain modules) + metadata
PROBE_FILE = "probe.pt"                   # raw outputs on the probe images (restore check)
ANALYSIS_JSON = "expert_analysis.json"    # per-layer load and co-activation on the val split
# Its folders in the run's storage (beside its checkpoint_* directories), MODEL_FILE inside.
DENSE_BASE_DIR = "dense_base"             # the dense base trained in the job
BASE_DIR = "base"                         # the given base staged for the workers
DENSE_PHASE = "dense"                     # the engine phase that trains the dense base (then "train")


@dataclass(kw_only=True)
class MoETuneRun(RunDescription):
    phrases: list[str]
    text_embeddings: list[list[float]]   # (P, dim) phrase embeddings, computed on the driver
    category_ids: list[int]
    build_options: dict[str, Any]
    parameter_counts: dict[str, Any]
    moe_meta: dict[str, Any] | None = None  # the MoE decomposition (None: dense fine-tuning)
    base_uri: str | None = None             # the staged dense base (None: the workers train it)


@dataclass
class MoETuneRecord(CheckpointRecord):
    base_metrics: dict[str, float] | None = None       # the dense base's val metrics
    step0: dict[str, Any] | None = None                # dense vs expert-parallel outputs at step 0
    restore_checks: list[dict[str, Any]] = field(default_factory=list)
    moe_layers: list[str] = field(default_factory=list)
    parameter_counts: dict[str, Any] = field(default_factory=dict)


SPEC = JobSpec(name="moe_tune", config_class=MoETuneConfig, run_class=MoETuneRun, record_class=MoETuneRecord,
               job="distillery.platform.moe.job:MoETuneJob",
               driver="distillery.platform.moe.driver:MoETuneDriver",
               description="MoE-tune (or fine-tune) an open-vocabulary detector with expert parallelism")
