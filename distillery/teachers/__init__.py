"""Frozen vision foundation models (plain PyTorch + timm): the teachers whose features are distilled."""

from distillery.teachers.dinov3 import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    LAYER_NAME,
    DinoV3Teacher,
    TeacherWeightsError,
    check_meta_checkpoint,
    convert_meta_state_dict,
    detect_checkpoint_layout,
    fingerprint_diff,
    fingerprint_digest,
    load_teacher_weights,
    read_state_dict,
    set_rope_periods,
    sha256_file,
)

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "LAYER_NAME",
    "DinoV3Teacher",
    "TeacherWeightsError",
    "check_meta_checkpoint",
    "convert_meta_state_dict",
    "detect_checkpoint_layout",
    "fingerprint_diff",
    "fingerprint_digest",
    "load_teacher_weights",
    "read_state_dict",
    "set_rope_periods",
    "sha256_file",
]
