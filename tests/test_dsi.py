"""Deep Semantic Injector loss and its place in the model (training only)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from distillery.students import build_student, dsi_loss


def _projector(c_in: int, c_out: int, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(c_in, c_out)


def test_aligned_features_give_zero():
    f5 = torch.randn(2, 8, 3, 4)
    proj = _projector(8, 12)
    with torch.no_grad():
        # The teacher is exactly what the projector makes of F5, times a positive per-position scale.
        target = proj(f5.flatten(2).transpose(1, 2)) * torch.rand(2, 12, 1).add(0.5)
        teacher = target.transpose(1, 2).reshape(2, 12, 3, 4)
    assert dsi_loss(f5, teacher, proj).item() == pytest.approx(0.0, abs=1e-6)
    assert dsi_loss(f5, -teacher, proj).item() == pytest.approx(2.0, abs=1e-6)


def test_orthogonal_features_give_one():
    f5 = torch.randn(2, 8, 3, 4)
    proj = _projector(8, 6)
    with torch.no_grad():
        proj.weight[3:] = 0  # the projection lives in channels 0..2
        proj.bias.zero_()
    teacher = torch.zeros(2, 6, 3, 4)
    teacher[:, 3:] = torch.randn(2, 3, 3, 4)  # the teacher in channels 3..5
    assert dsi_loss(f5, teacher, proj).item() == pytest.approx(1.0, abs=1e-6)


def test_matches_per_position_definition():
    f5 = torch.randn(2, 8, 3, 4)
    teacher = torch.randn(2, 10, 3, 4)
    proj = _projector(8, 10)
    expected = 0.0
    for b in range(2):
        for i in range(3):
            for j in range(4):
                expected += 1 - F.cosine_similarity(proj(f5[b, :, i, j]), teacher[b, :, i, j], dim=0)
    torch.testing.assert_close(dsi_loss(f5, teacher, proj), expected / 24)


def test_teacher_grid_is_resized_to_f5():
    f5 = torch.randn(2, 8, 4, 4)
    proj = _projector(8, 10)
    big = torch.randn(2, 10, 10, 7)
    resized = F.interpolate(big, size=(4, 4), mode="bilinear", align_corners=False)
    torch.testing.assert_close(dsi_loss(f5, big, proj), dsi_loss(f5, resized, proj))
    assert not torch.allclose(dsi_loss(f5, big, proj), dsi_loss(f5, big[:, :, :4, :4], proj))
    # A spatially constant teacher equal to the (constant) projected student is aligned at any size.
    flat = torch.randn(1, 8, 1, 1).expand(1, 8, 4, 4)
    with torch.no_grad():
        v = proj(flat[0, :, 0, 0])
    assert dsi_loss(flat, v.view(1, 10, 1, 1).expand(1, 10, 20, 20), proj).item() == pytest.approx(0, abs=1e-6)


def test_gradients_and_errors():
    f5 = torch.randn(2, 8, 3, 3, requires_grad=True)
    proj = _projector(8, 10)
    teacher = torch.randn(2, 10, 3, 3, requires_grad=True)
    dsi_loss(f5, teacher, proj).backward()
    assert f5.grad.abs().sum() > 0 and proj.weight.grad.abs().sum() > 0
    assert teacher.grad is None  # the teacher is a constant
    with pytest.raises(ValueError, match="768"):
        dsi_loss(f5.detach(), torch.randn(2, 768, 3, 3), proj)
    with pytest.raises(ValueError, match="batch"):
        dsi_loss(f5.detach(), torch.randn(1, 10, 3, 3), proj)


def test_model_never_calls_dsi_in_forward():
    model = build_student("rtdetrv4_tiny")
    calls = []
    model.dsi.register_forward_hook(lambda *args: calls.append(1))
    images = torch.rand(2, 3, 128, 128)
    model.eval()
    with torch.no_grad():
        out = model(images)
    assert set(out) == {"pred_logits", "pred_boxes"} and not calls

    # Without the projector the eval output is identical.
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("dsi.")}
    bare = build_student("rtdetrv4_tiny", dsi=False)
    bare.load_state_dict(state, strict=True)
    bare.eval()
    with torch.no_grad():
        again = bare(images)
    torch.testing.assert_close(again["pred_logits"], out["pred_logits"])
    torch.testing.assert_close(again["pred_boxes"], out["pred_boxes"])

    # Training: F5 comes out, and only dsi_loss uses the projector.
    model.train()
    out = model(images, None)
    assert not calls
    loss = dsi_loss(out["f5"], torch.randn(2, 768, 20, 20), model.dsi)
    assert calls and torch.isfinite(loss)


def test_mask_excludes_positions_without_teacher_features():
    import torch
    from torch import nn

    from distillery.students import dsi_loss

    proj = nn.Identity()
    f5 = torch.randn(2, 8, 3, 3)
    teacher = f5.clone()
    teacher[:, :, 0, :] = -f5[:, :, 0, :]  # row 0: opposite (cos = -1 -> loss 2)
    mask = torch.ones(2, 3, 3, dtype=torch.bool)
    assert abs(dsi_loss(f5, teacher, proj).item() - 2 / 3) < 1e-5
    mask[:, 0, :] = False
    assert dsi_loss(f5, teacher, proj, mask=mask).item() < 1e-5
    with pytest.raises(ValueError, match="mask must be"):
        dsi_loss(f5, teacher, proj, mask=mask[:, :2])
