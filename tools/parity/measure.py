"""Print the README's parity table from the fixtures: max |ours - official| per case (no official code needed).

    python tools/parity/measure.py [--fixtures tests/fixtures/parity]

One JSON line per case (logits, boxes, loss: the largest absolute difference over all elements /
all loss terms; detections: our post-processing of the official outputs bit-identical to the
official post-processor's, and from our own outputs the same labels in the same order with the
largest box difference in pixels), then the Markdown rows.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))

from test_parity_official import load_case, our_model, targets_of  # noqa: E402

from distillery.students import build_criterion, criterion_options  # noqa: E402
from distillery.students.postprocess import postprocess  # noqa: E402


def measure(case: str) -> dict:
    meta, tensors = load_case(case)
    model = our_model(meta, tensors).eval()
    with torch.no_grad():
        out = model(tensors["images"])
    detections = postprocess(out["pred_logits"], out["pred_boxes"], tensors["orig_sizes"],
                             num_top=meta["num_top_queries"])
    same_labels = all(torch.equal(d["labels"], tensors[f"detections/{i}/labels"]) for i, d in enumerate(detections))
    box_diff = max(float((d["boxes"] - tensors[f"detections/{i}/boxes"]).abs().max()) for i, d in enumerate(detections))
    official = postprocess(tensors["pred_logits"], tensors["pred_boxes"], tensors["orig_sizes"],
                           num_top=meta["num_top_queries"])
    identical = all(torch.equal(d[k], tensors[f"detections/{i}/{k}"]) for i, d in enumerate(official)
                    for k in ("labels", "boxes", "scores"))
    model.train()
    targets = targets_of(tensors)
    torch.manual_seed(meta["loss_seed"])
    losses = build_criterion(meta["student_overrides"]["num_classes"], **criterion_options(meta["student"]))(
        model(tensors["images"], targets), targets)  # the size's criterion, as the jobs build it
    return {
        "case": case,
        "student": meta["student"],
        "official": f"{meta['official_repo']}@{meta['official_commit'][:7]}",
        "logits": float((out["pred_logits"] - tensors["pred_logits"]).abs().max()),
        "boxes": float((out["pred_boxes"] - tensors["pred_boxes"]).abs().max()),
        "loss": max(abs(float(losses[k]) - v) for k, v in meta["losses"].items()),
        "loss_terms": len(meta["losses"]),
        "postprocess_of_official_outputs_identical": identical,
        "detections_same_labels_from_our_outputs": same_labels,
        "detections_max_box_diff_px": box_diff,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fixtures", type=Path, default=Path(__file__).resolve().parents[2] / "tests/fixtures/parity")
    args = parser.parse_args()
    rows = [measure(p.stem) for p in sorted(args.fixtures.glob("*.json"))]
    for row in rows:
        print(json.dumps(row))
    for r in rows:
        print(f"| {r['student']} (reduced) | {r['logits']:.1e} | {r['boxes']:.1e} | {r['loss']:.1e} "
              f"({r['loss_terms']} terms) | {r['official']} |")


if __name__ == "__main__":
    main()
