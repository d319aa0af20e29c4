"""ONNX export of an RT-DETRv4 student: onnxruntime parity, dynamic batch, and no DSI projector inside.

The students are ``rtdetrv4_tiny`` at 128 px after one training step of the fit loop (so BatchNorm
statistics and weights are no longer at their initial values), one with a DSI projector of an
unusual width (77, so that any trace of it in the graph would show) and one built without DSI
holding the same inference weights.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from distillery.students import build_criterion, build_student
from distillery.students.export import InferenceDetector, export_onnx, onnx_parity
from distillery.students.fit import fit
from distillery.students.gam import GAM_DEFAULTS, GAMController

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

SIZE = 128
TEACHER_DIM = 77  # no other tensor of the tiny model has a dimension of 77
NUM_TOP = 20
# Max abs difference allowed between onnxruntime and PyTorch (float32, CPU). Measured on this
# test's inputs: logits 9.5e-7, normalised boxes 2.4e-7, scores 6.0e-8, pixel boxes 3.8e-5 (128 px).
TOLERANCE = {"max_abs_pred_logits": 1e-4, "max_abs_pred_boxes": 1e-5, "max_abs_scores": 1e-5,
             "max_abs_boxes": 2e-3}
# The tracer's notes on shape arithmetic (the input size is fixed per export, as in the reference).
pytestmark = [pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning"),
              pytest.mark.filterwarnings("ignore:Constant folding:UserWarning")]


def _batches():
    generator = torch.Generator().manual_seed(0)
    while True:
        yield {"images": torch.rand(2, 3, SIZE, SIZE, generator=generator),
               "targets": [{"labels": torch.tensor([0, 4]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2],
                                                                                   [0.6, 0.6, 0.3, 0.4]])},
                           {"labels": torch.tensor([5]), "boxes": torch.tensor([[0.5, 0.5, 0.5, 0.5]])}],
               "teacher_grid": torch.randn(2, TEACHER_DIM, 4, 4, generator=generator)}


@pytest.fixture(scope="module")
def students():
    """(with DSI, without DSI): one fit step with GAM and DSI, then the same inference weights in a
    model built without the projector."""
    torch.manual_seed(0)
    with_dsi = build_student("rtdetrv4_tiny", num_classes=6, eval_spatial_size=SIZE, teacher_dim=TEACHER_DIM)
    gam = GAMController(**GAM_DEFAULTS["rtdetrv4_tiny"])
    fit(with_dsi, build_criterion(num_classes=6), _batches(), steps=1, lr=1e-3, gam=gam, ema_decay=None)
    assert with_dsi.dsi.weight.grad is None  # gradients were consumed and zeroed
    without_dsi = build_student("rtdetrv4_tiny", num_classes=6, eval_spatial_size=SIZE, dsi=False)
    inference_state = {k: v for k, v in with_dsi.state_dict().items() if not k.startswith("dsi.")}
    without_dsi.load_state_dict(inference_state, strict=True)  # strict: every other key matches
    return with_dsi.eval(), without_dsi.eval()


@pytest.fixture(scope="module")
def exported(students, tmp_path_factory):
    directory = tmp_path_factory.mktemp("onnx")
    with_dsi, without_dsi = students
    paths = {"with_dsi": directory / "with_dsi.onnx", "without_dsi": directory / "without_dsi.onnx"}
    metas = {"with_dsi": export_onnx(with_dsi, paths["with_dsi"], SIZE, num_top=NUM_TOP),
             "without_dsi": export_onnx(without_dsi, paths["without_dsi"], SIZE, num_top=NUM_TOP)}
    return paths, metas


def test_onnxruntime_matches_pytorch(students, exported):
    with_dsi, _ = students
    paths, metas = exported
    assert metas["with_dsi"]["outputs"] == ["pred_logits", "pred_boxes", "scores", "labels", "boxes"]
    # Seed 4: with seed 3 two encoder proposals of the third image tie within float noise in the
    # top-k query selection (since the AIFI table is the official one), so onnxruntime and PyTorch
    # may keep different queries (raw pred_* differ, the post-processed detections still agree).
    torch.manual_seed(4)
    images = torch.rand(3, 3, SIZE, SIZE)  # batch 3: the export was traced with batch 2
    diffs = onnx_parity(with_dsi, paths["with_dsi"], images, SIZE, NUM_TOP)
    print("onnxruntime vs PyTorch, max abs:", {k: f"{v:.2e}" for k, v in diffs.items()})
    assert set(diffs) == set(TOLERANCE)
    for name, limit in TOLERANCE.items():
        assert diffs[name] <= limit, (name, diffs)

    # Batch 1, and the labels too (the top-k order must agree, not only the values).
    session = ort.InferenceSession(str(paths["with_dsi"]), providers=["CPUExecutionProvider"])
    logits, boxes, scores, labels, xyxy = session.run(None, {"images": images[:1].numpy()})
    assert logits.shape == (1, with_dsi.spec.num_queries, 6) and scores.shape == (1, NUM_TOP)
    with torch.no_grad():
        ref = InferenceDetector(with_dsi, SIZE, NUM_TOP)(images[:1])
    np.testing.assert_array_equal(labels, ref[3].numpy())
    np.testing.assert_allclose(xyxy, ref[4].numpy(), atol=TOLERANCE["max_abs_boxes"])
    assert (xyxy >= -1e-3).all() and (xyxy <= SIZE + 1e-3).all()  # pixels of the 128 x 128 input


def test_dsi_projector_is_not_exported(students, exported):
    with_dsi, without_dsi = students
    paths, metas = exported
    # The export left the training model alone ...
    assert with_dsi.dsi is not None and with_dsi.dsi.out_features == TEACHER_DIM
    # ... and the exported module has no projector.
    detector = InferenceDetector(with_dsi, SIZE, NUM_TOP)
    assert not [k for k in detector.state_dict() if "dsi" in k]
    assert metas["with_dsi"]["parameters"] == with_dsi.num_inference_parameters()
    assert metas["with_dsi"]["parameters"] == metas["without_dsi"]["parameters"]
    assert with_dsi.num_inference_parameters() < sum(p.numel() for p in with_dsi.parameters())

    graphs = {k: onnx.load(str(p)) for k, p in paths.items()}
    for graph in graphs.values():
        onnx.checker.check_model(graph)
        names = [i.name for i in graph.graph.initializer] + [n.name for n in graph.graph.node]
        assert not [n for n in names if "dsi" in n.lower()]
        assert not [i.name for i in graph.graph.initializer if TEACHER_DIM in i.dims]
    # Same graph size with and without the projector: nothing of it went in.
    sizes = {k: sum(int(np.prod(i.dims)) for i in g.graph.initializer) for k, g in graphs.items()}
    assert sizes["with_dsi"] == sizes["without_dsi"], sizes
    assert len(graphs["with_dsi"].graph.node) == len(graphs["without_dsi"].graph.node)


def test_exports_with_and_without_dsi_give_the_same_detections(exported):
    paths, _ = exported
    images = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(4)).numpy()
    outputs = {k: ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, {"images": images})
               for k, p in paths.items()}
    for a, b in zip(outputs["with_dsi"], outputs["without_dsi"]):
        np.testing.assert_array_equal(a, b)


def test_export_refuses_a_size_off_the_stride(students, tmp_path):
    with pytest.raises(ValueError, match="multiple of 32"):
        export_onnx(students[0], tmp_path / "bad.onnx", 100)
