"""RT-DETRv4 S/M/L/X have the paper's inference-model sizes: parameters and GFLOPs at 640 x 640.

What is counted:

* Parameters: every parameter of the deployed detector (backbone, encoder, decoder, including
  the training-only denoising class embedding, as the reference counts), the DSI projector
  excluded (built with ``dsi=False``).
* FLOPs: ``torch.utils.flop_counter.FlopCounterMode`` over one eval-mode forward of a
  1 x 3 x 640 x 640 input, as it reports them: 2 FLOPs per multiply-add of convolutions and
  matrix products (conv, mm, addmm, bmm); grid_sample, softmax, normalisation and activations are
  not counted. The models are built on the ``meta`` device (shapes only, no arithmetic), so the
  count costs nothing; ``test_meta_count_equals_real_count`` checks that a real CPU forward of S
  counts exactly the same when attention runs on PyTorch's math backend (the fused CPU
  scaled-dot-product kernel is invisible to FlopCounterMode, which would drop the attention
  matmuls, 0.44 GFLOPs for S).

Targets: the paper's 10 / 19 / 31 / 62 M parameters (within 5 %) and 25 / 57 / 91 / 202 GFLOPs
(within 15 %). Tighter: the official RT-DETRv4 code (engine/rtv4 + engine/backbone/hgnetv2.py,
configs/rtv4/*.yml) has 10,321,877 / 19,590,064 / 31,289,848 / 62,715,480 parameters, two of them
the frozen scalars ``up`` and ``reg_scale`` that are constants here; our counts must agree within
10 parameters.
"""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from distillery.students import build_student

PAPER = {  # name: (M params, GFLOPs)
    "rtdetrv4_s": (10, 25),
    "rtdetrv4_m": (19, 57),
    "rtdetrv4_l": (31, 91),
    "rtdetrv4_x": (62, 202),
}
OFFICIAL_PARAMS = {
    "rtdetrv4_s": 10_321_877,
    "rtdetrv4_m": 19_590_064,
    "rtdetrv4_l": 31_289_848,
    "rtdetrv4_x": 62_715_480,
}


def _count(name: str, device: str, **overrides) -> tuple[int, float]:
    with torch.device(device):
        model = build_student(name, dsi=False, **overrides)
    model.eval()
    params = sum(p.numel() for p in model.parameters())
    height, width = model.eval_spatial_size
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), counter:
        model(torch.rand(1, 3, height, width, device=device))
    return params, counter.get_total_flops() / 1e9


@pytest.mark.parametrize("name", list(PAPER))
def test_paper_sizes(name):
    params, gflops = _count(name, "meta")
    paper_m, paper_gflops = PAPER[name]
    print(f"\n{name}: {params / 1e6:.3f} M params (paper {paper_m} M, official code "
          f"{OFFICIAL_PARAMS[name] / 1e6:.3f} M), {gflops:.2f} GFLOPs at 640x640 (paper {paper_gflops})")
    assert abs(params / 1e6 - paper_m) <= 0.05 * paper_m
    assert abs(gflops - paper_gflops) <= 0.15 * paper_gflops
    assert abs(params - OFFICIAL_PARAMS[name]) <= 10


def test_meta_count_equals_real_count():
    torch.manual_seed(0)
    meta = _count("rtdetrv4_s", "meta")
    real = _count("rtdetrv4_s", "cpu")
    print(f"\nrtdetrv4_s real forward: {real[0] / 1e6:.3f} M params, {real[1]:.2f} GFLOPs")
    assert meta == real


def test_tiny_is_small():
    params, gflops = _count("rtdetrv4_tiny", "meta")
    print(f"\nrtdetrv4_tiny: {params / 1e6:.3f} M params, {gflops:.3f} GFLOPs at 256x256")
    assert params < 3e6 and gflops < 2
