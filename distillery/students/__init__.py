"""Student detectors and their training losses (plain PyTorch; no Ray / DeepSpeed / MLflow here).

RT-DETRv4: :func:`build_student` (model) and :func:`build_criterion` (DEIM detection loss);
:func:`dsi_loss` is the Deep Semantic Injector's alignment loss on the AIFI output;
:func:`load_student_weights` reads official / Distillery / plain checkpoints into a student.
"""

from .criterion import DEFAULT_LOSS_WEIGHTS, RTDETRv4Criterion, build_criterion, criterion_options
from .dsi import dsi_loss
from .matcher import HungarianMatcher
from .rtdetrv4 import COMPONENTS, RTDETRv4, STUDENT_SPECS, StudentSpec, build_student
from .weights import WeightsError, WeightsReport, load_student_weights

__all__ = [
    "COMPONENTS",
    "DEFAULT_LOSS_WEIGHTS",
    "HungarianMatcher",
    "RTDETRv4",
    "RTDETRv4Criterion",
    "STUDENT_SPECS",
    "StudentSpec",
    "WeightsError",
    "WeightsReport",
    "build_criterion",
    "build_student",
    "criterion_options",
    "dsi_loss",
    "load_student_weights",
]
