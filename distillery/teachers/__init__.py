"""Frozen vision foundation models (plain PyTorch + timm): the teachers whose features are distilled.

The public names of :mod:`.dinov3` (the teacher, its fingerprint) and :mod:`.dinov3_weights` (reading
and checking its weights files).
"""

from distillery.teachers.dinov3 import (IMAGENET_MEAN, IMAGENET_STD, LAYER_NAME, DinoV3Teacher, fingerprint_diff,
                                        fingerprint_digest)
from distillery.teachers.dinov3_weights import (TeacherWeightsError, check_meta_checkpoint, convert_meta_state_dict,
                                                detect_checkpoint_layout, load_teacher_weights, read_state_dict,
                                                set_rope_periods, sha256_file)

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "LAYER_NAME", "DinoV3Teacher", "fingerprint_diff", "fingerprint_digest",
           "TeacherWeightsError", "check_meta_checkpoint", "convert_meta_state_dict", "detect_checkpoint_layout",
           "load_teacher_weights", "read_state_dict", "set_rope_periods", "sha256_file"]
