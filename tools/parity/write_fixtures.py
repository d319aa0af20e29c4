"""Write the parity fixtures of tests/test_parity_official.py from the official RT-DETRv4 / DEIMv2 code.

Usage (each official checkout at its pinned commit, unmodified; its own dependencies installed,
e.g. ``pip install tensorboard faster-coco-eval calflops``)::

    python tools/parity/write_fixtures.py rtdetrv4 /path/to/RT-DETRv4 [--out tests/fixtures/parity]
    python tools/parity/write_fixtures.py deimv2 /path/to/DEIMv2 [--out tests/fixtures/parity]

The official code is imported from the given path (added to ``sys.path``), never copied. For
each case a REDUCED official config (the official recipe YAML with small widths, few queries,
128 x 128 input) is built with the official config system, its weights are seeded (the official
initialisation plus seeded noise, so that zero-initialised heads say something) and rounded to
float16-representable values (stored as float16: half the size, the same float32 numbers), and
a seeded input goes through it. Written per case: ``<case>.safetensors`` (the official state
dict in the official key layout under ``weights/``, the input, the targets, the eval outputs
and the post-processed detections) and ``<case>.json`` (official repository and commit, the
reduced config, our student name and overrides, the per-term training losses).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

SIZE = 128
NUM_CLASSES = 80
SEED = 20260

# case -> (official repo name, config path, official overrides, our student, our overrides)
CASES = {
    "rtdetrv4_s_reduced": (
        "rtdetrv4", "configs/rtv4/rtv4_hgnetv2_s_coco.yml",
        {"HGNetv2": {"pretrained": False},
         "HybridEncoder": {"hidden_dim": 64, "dim_feedforward": 128, "nhead": 4, "distill_teacher_dim": 32},
         "DFINETransformer": {"hidden_dim": 64, "dim_feedforward": 128, "nhead": 4, "num_layers": 2, "num_queries": 30,
                              "num_denoising": 20, "feat_channels": [64, 64, 64]},
         # The DSI loss needs the teacher (and CUDA there); ours is tested on its own (tests/test_dsi*).
         "RTv4Criterion": {"losses": ["mal", "boxes", "local"]}},
        "rtdetrv4_s",
        {"encoder_hidden_dim": 64, "encoder_ffn_dim": 128, "encoder_heads": 4, "decoder_hidden_dim": 64,
         "decoder_ffn_dim": 128, "decoder_heads": 4, "num_decoder_layers": 2, "num_queries": 30, "num_denoising": 20,
         "teacher_dim": 32},
    ),
    "deimv2_s_reduced": (
        "deimv2", "configs/deimv2/deimv2_dinov3_s_coco.yml",
        {"DINOv3STAs": {"embed_dim": 64, "num_heads": 2, "conv_inplane": 8, "weights_path": None},
         "HybridEncoder": {"in_channels": [64, 64, 64], "hidden_dim": 64, "dim_feedforward": 128},
         "DEIMTransformer": {"feat_channels": [64, 64, 64], "hidden_dim": 64, "dim_feedforward": 128, "num_layers": 2,
                             "num_queries": 30, "num_denoising": 20}},
        "deimv2_s",
        {"vit_dim": 64, "vit_heads": 2, "sta_channels": 8, "encoder_hidden_dim": 64, "encoder_ffn_dim": 128,
         "decoder_hidden_dim": 64, "decoder_ffn_dim": 128, "num_decoder_layers": 2, "num_queries": 30,
         "num_denoising": 20},
    ),
    "deimv2_pico_reduced": (
        "deimv2", "configs/deimv2/deimv2_hgnetv2_pico_coco.yml",
        {"HGNetv2": {"pretrained": False},
         "LiteEncoder": {"hidden_dim": 64},
         "DEIMTransformer": {"feat_channels": [64, 64], "hidden_dim": 64, "dim_feedforward": 128, "num_queries": 30,
                             "num_denoising": 20}},
        "deimv2_pico",
        {"encoder_hidden_dim": 64, "decoder_hidden_dim": 64, "decoder_ffn_dim": 128, "num_queries": 30,
         "num_denoising": 20},
    ),
    "deimv2_n_reduced": (
        "deimv2", "configs/deimv2/deimv2_hgnetv2_n_coco.yml",
        {"HGNetv2": {"pretrained": False},
         "HybridEncoder": {"hidden_dim": 64, "dim_feedforward": 128},
         "DEIMTransformer": {"feat_channels": [64, 64], "hidden_dim": 64, "dim_feedforward": 128, "num_layers": 2,
                             "num_queries": 30, "num_denoising": 20}},
        "deimv2_n",
        {"encoder_hidden_dim": 64, "encoder_ffn_dim": 128, "decoder_hidden_dim": 64, "decoder_ffn_dim": 128,
         "num_decoder_layers": 2, "num_queries": 30, "num_denoising": 20},
    ),
    **{f"deimv2_{size}_reduced": (
        "deimv2", f"configs/deimv2/deimv2_dinov3_{size}_coco.yml",
        {"DINOv3STAs": {"name": vit, "weights_path": None, "conv_inplane": 8, "hidden_dim": width},
         "HybridEncoder": {"in_channels": [width] * 3, "hidden_dim": width, "dim_feedforward": 2 * width},
         "DEIMTransformer": {"feat_channels": [width] * 3, "hidden_dim": 64, "dim_feedforward": 128, "num_layers": 2,
                             "num_queries": 30, "num_denoising": 20}},
        f"deimv2_{size}",
        {"vit_dim": 32, "vit_heads": 2, "sta_channels": 8, "sta_dim": width, "encoder_hidden_dim": width,
         "encoder_ffn_dim": 2 * width, "decoder_hidden_dim": 64, "decoder_ffn_dim": 128, "num_decoder_layers": 2,
         "num_queries": 30, "num_denoising": 20},
    # the STA and encoder narrower than S's (X's: expansion 1.25, depth x1.37): each fixture under 2 MB
    ) for size, vit, width in (("l", "dinov3_vits16_w32", 48), ("x", "dinov3_vits16plus_w32", 32))},
}
# DEIMv2 L/X: the DINOv3 ViT-S/S+ widths are no options of the official YAML (DinoVisionTransformer
# reads them by name from the ``configs`` table of engine/backbone/dinov3/vision_transformer.py).
# Reduced copies (width 32, 2 heads; everything else, depth, FFN, storage tokens, masked key bias,
# RoPE, as the original) are added to that table in memory under new names before the model is
# built; the official file is unchanged.
OFFICIAL_VIT_TABLE = {"dinov3_vits16_w32": ("dinov3_vits16", {"embed_dim": 32, "num_heads": 2}),
                      "dinov3_vits16plus_w32": ("dinov3_vits16plus", {"embed_dim": 32, "num_heads": 2})}
NORMALISED_INPUT = {"deimv2_s_reduced", "deimv2_l_reduced", "deimv2_x_reduced"}
# Cases whose seeded input is rounded to float16-representable values (stored as float16: the
# same float32 numbers in half the bytes), to keep their fixtures under 2 MB.
HALF_STORED_INPUT = {"deimv2_l_reduced", "deimv2_x_reduced"}
# case -> (reduced case, key prefix): tensors taken from that case's fixture (its seeded values, the
# same official names and shapes) instead of seeded anew and stored twice; the json records the
# file and its sha256. DEIMv2-N's backbone is RT-DETRv4-S's HGNetv2-B0 (use_lab) unchanged.
SHARED_WEIGHTS = {"deimv2_n_reduced": ("rtdetrv4_s_reduced", "backbone.")}
IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
OFFICIAL_REPOS = {"rtdetrv4": "RT-DETRs/RT-DETRv4", "deimv2": "Intellindust-AI-Lab/DEIMv2"}


def official_commit(repo: Path) -> str:
    """The checkout's commit: ``git rev-parse HEAD``, or a ``COMMIT`` file for an exported tree."""
    marker = repo / "COMMIT"
    if marker.is_file():
        return marker.read_text().strip()
    result = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{repo}: not a git checkout and no COMMIT file; cannot record the official commit")
    return result.stdout.strip()


def official_config(repo: Path, config: str, overrides: dict, **top):
    """The official ``YAMLConfig`` of ``config``, reduced by ``overrides`` (``top``: more top-level keys)."""
    if str(repo) not in sys.path:
        sys.path.insert(0, str(repo))
    from engine.core import YAMLConfig  # the official package, from the checkout

    vit_name = overrides.get("DINOv3STAs", {}).get("name")
    if vit_name in OFFICIAL_VIT_TABLE:
        from engine.backbone.dinov3.vision_transformer import configs as vit_table
        base, widths = OFFICIAL_VIT_TABLE[vit_name]
        vit_table[vit_name] = {**vit_table[base], **widths}

    size = [SIZE, SIZE]
    sections = {k: dict(v) for k, v in overrides.items()}
    for name, section in sections.items():
        if name in ("HybridEncoder", "LiteEncoder", "DFINETransformer", "DEIMTransformer"):
            section.setdefault("eval_spatial_size", size)
    return YAMLConfig(str(repo / config), num_classes=NUM_CLASSES, eval_spatial_size=size, **sections, **top)


def build_official(repo: Path, config: str, overrides: dict):
    """(model, criterion, postprocessor) of the official config system, reduced by ``overrides``."""
    cfg = official_config(repo, config, overrides)
    start_dinov3_as_released(cfg.model)
    return cfg.model, cfg.criterion, cfg.postprocessor


@torch.no_grad()
def start_dinov3_as_released(model: torch.nn.Module) -> None:
    """DEIMv2 L/X: the state the official recipe starts its DINOv3 ViT-S/S+ from, without Meta's file.

    The official recipes always load Meta's pretrained ViT (``DINOv3STAs(weights_path=...)``); built
    without it ("Training DINOv3 from scratch") the official ViT keeps ``torch.empty`` class, storage
    and mask tokens and a NaN ``qkv.bias_mask`` (``LinearKMaskedBias`` fills it with NaN; only the
    checkpoint sets it), so every output is NaN. Here the official ViT's own ``init_weights()`` runs
    and each ``bias_mask`` gets the released checkpoints' value (1 for the query and value thirds, 0 for
    the key third: ``mask_k_bias``), as loading Meta's file would; the official code is unchanged."""
    vit = getattr(getattr(model, "backbone", None), "dinov3", None)
    if type(vit).__name__ != "DinoVisionTransformer":
        return  # not the official DINOv3 ViT (the distilled ViT-Tiny of S/M initialises itself)
    vit.init_weights()
    for module in vit.modules():
        mask = getattr(module, "bias_mask", None)
        if mask is not None:
            third = mask.numel() // 3
            mask.fill_(1.0)
            mask[third:2 * third] = 0.0


@torch.no_grad()
def seed_weights(model: torch.nn.Module, seed: int) -> None:
    """Official init + seeded noise on every trainable tensor and BN statistics; float16-representable values."""
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if param.requires_grad:
            param.add_(torch.randn(param.shape, generator=generator) * 0.02)
        param.copy_(param.half().float())
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.running_mean.copy_((torch.randn(module.running_mean.shape, generator=generator) * 0.1).half().float())
            module.running_var.copy_((torch.rand(module.running_var.shape, generator=generator) + 0.5).half().float())


def _compact(tensor: torch.Tensor) -> torch.Tensor:
    """float16 when that holds the value exactly (the seeded weights), else as is (e.g. anchor buffers)."""
    tensor = tensor.detach()
    if tensor.is_floating_point() and torch.equal(tensor.half().to(tensor.dtype), tensor):
        return tensor.half().clone()
    return tensor.clone()


def seeded_batch(seed: int) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(2, 3, SIZE, SIZE, generator=generator)
    targets = [
        {"labels": torch.tensor([1, 7, 7]),
         "boxes": torch.tensor([[0.30, 0.35, 0.20, 0.25], [0.65, 0.55, 0.35, 0.40], [0.50, 0.50, 0.90, 0.85]])},
        {"labels": torch.tensor([3]), "boxes": torch.tensor([[0.40, 0.60, 0.30, 0.20]])},
    ]
    return images, targets


def write_case(out_dir: Path, case: str, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """``<case>.safetensors`` and ``<case>.json``, each written atomically."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for path, write in ((out_dir / f"{case}.safetensors", lambda p: save_file(tensors, p)),
                        (out_dir / f"{case}.json", lambda p: Path(p).write_text(json.dumps(meta, indent=2) + "\n"))):
        with tempfile.NamedTemporaryFile(dir=out_dir, delete=False, suffix=".tmp") as handle:
            tmp = handle.name
        try:
            write(tmp)
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)  # atomic
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)


def run_case(case: str, repo: Path, out_dir: Path, seed: int = SEED) -> None:
    kind, config, overrides, student, our_overrides = CASES[case]
    commit = official_commit(repo)
    torch.manual_seed(seed)
    model, criterion, postprocessor = build_official(repo, config, overrides)
    postprocessor.remap_mscoco_category = False  # contiguous class indices, as ours (COCO ids are a data concern)
    seed_weights(model, seed)
    shared = SHARED_WEIGHTS.get(case)
    if shared is not None:
        source = out_dir / f"{shared[0]}.safetensors"
        taken = {k[len("weights/"):]: v.float() if v.is_floating_point() else v
                 for k, v in load_file(str(source)).items() if k.startswith(f"weights/{shared[1]}")}
        own = {k for k in model.state_dict() if k.startswith(shared[1])}
        if set(taken) != own:
            raise SystemExit(f"{source}: its {shared[1]}* keys differ from {case}'s: "
                             f"{sorted(set(taken) ^ own)[:10]}")
        model.load_state_dict(taken, strict=False)
    images, targets = seeded_batch(seed + 1)
    if case in HALF_STORED_INPUT:
        images = images.half().float()
    # The official DINOv3 recipes normalise in the data pipeline ({type: Normalize, ImageNet mean/std});
    # our DINOv3 students take [0, 1] RGB and normalise inside the model. The fixture's "images" are
    # the [0, 1] input; the official model sees them normalised, as its pipeline would hand them over.
    model_input = (images - IMAGENET_MEAN) / IMAGENET_STD if case in NORMALISED_INPUT else images
    orig_sizes = torch.tensor([[SIZE, SIZE], [2 * SIZE, SIZE]], dtype=torch.float32)  # (w, h)

    # The weights as they are now: the training forward below updates the BatchNorm statistics.
    weights = {f"weights/{k}": _compact(v) for k, v in model.state_dict().items()
               if shared is None or not k.startswith(shared[1])}
    model.eval()
    with torch.no_grad():
        out = model(model_input)
        detections = postprocessor(out, orig_sizes)
    model.train()
    torch.manual_seed(seed + 2)  # the denoising queries draw from the global generator
    train_out = model(model_input, targets)
    losses = criterion(train_out, targets, epoch=0)
    losses = {k: float(v.detach()) for k, v in sorted(losses.items())}

    tensors = dict(weights)
    tensors.update({"images": _compact(images) if case in HALF_STORED_INPUT else images, "orig_sizes": orig_sizes,
                    "pred_logits": out["pred_logits"].detach(), "pred_boxes": out["pred_boxes"].detach()})
    for i, target in enumerate(targets):
        tensors[f"targets/{i}/labels"] = target["labels"]
        tensors[f"targets/{i}/boxes"] = target["boxes"]
    for i, det in enumerate(detections):
        for key in ("labels", "boxes", "scores"):
            tensors[f"detections/{i}/{key}"] = det[key].detach()
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    meta = {
        "case": case,
        "official_repo": OFFICIAL_REPOS[kind],
        "official_commit": commit,
        "official_config": config,
        "official_overrides": overrides,
        **({"official_vit_table_addition": {"name": n, "copy_of": OFFICIAL_VIT_TABLE[n][0],
                                            "changed": OFFICIAL_VIT_TABLE[n][1]}}
           if (n := overrides.get("DINOv3STAs", {}).get("name")) in OFFICIAL_VIT_TABLE else {}),
        "student": student,
        "student_overrides": {**our_overrides, "num_classes": NUM_CLASSES, "eval_spatial_size": SIZE},
        "seed": seed,
        "loss_seed": seed + 2,
        "official_input": "ImageNet-normalised images" if case in NORMALISED_INPUT else "images",
        "num_top_queries": int(postprocessor.num_top_queries),
        "weights_dtype": "float16 where the float32 value is float16-representable, else float32; load as float32",
        "losses": losses,
        # the official criterion's settings that differ from our defaults (ultra-light recipes:
        # no FGL/DDF ("local") losses, no union-set matching)
        "criterion_overrides": {k: v for k, v in (("local_losses", "local" in criterion.losses),
                                                  ("use_union_set", bool(getattr(criterion, "use_uni_set", True))))
                                if not v},
        "num_weights": sum(int(v.numel()) for k, v in tensors.items() if k.startswith("weights/")),
    }
    if shared is not None:
        meta["shared_weights"] = {"file": f"{shared[0]}.safetensors", "prefix": shared[1],
                                  "sha256": hashlib.sha256((out_dir / f"{shared[0]}.safetensors").read_bytes()).hexdigest()}
    write_case(out_dir, case, tensors, meta)
    print(json.dumps({"case": case, "commit": commit, "losses": len(losses),
                      "bytes": (out_dir / f"{case}.safetensors").stat().st_size}))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=sorted(OFFICIAL_REPOS))
    parser.add_argument("repo", type=Path, help="official checkout (RT-DETRv4 or DEIMv2) at its pinned commit")
    parser.add_argument("--out", type=Path, default=Path("tests/fixtures/parity"))
    parser.add_argument("--case", action="append", help="only these cases (default: all of this kind)")
    args = parser.parse_args(argv)
    repo = args.repo.resolve()
    if not (repo / "engine" / "core").is_dir():
        raise SystemExit(f"{repo}: not an official RT-DETRv4 / DEIMv2 checkout (no engine/core)")
    cases = args.case or [c for c, spec in CASES.items() if spec[0] == args.kind]
    for case in cases:
        if CASES[case][0] != args.kind:
            raise SystemExit(f"case {case!r} belongs to {CASES[case][0]}, not {args.kind}")
        # The official GIoU asserts x2 >= x1; a seeded model can predict an inverted box: then the
        # next seed (SEED + 10 k; the json records the one used).
        for attempt in range(5):
            try:
                run_case(case, repo, args.out.resolve(), SEED + 10 * attempt)
                break
            except AssertionError as exc:
                print(f"{case}: seed {SEED + 10 * attempt}: official assertion failed ({exc!r}), next seed")
        else:
            raise SystemExit(f"{case}: no seed among 5 gives valid official boxes")


if __name__ == "__main__":
    main()
