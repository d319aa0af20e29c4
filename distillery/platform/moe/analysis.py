"""Dynamic-DINO's expert analysis: per-layer load, co-activation and stable partners, and figures."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)


def expert_analysis(traces: dict[str, torch.Tensor], num_experts: int, threshold: float) -> dict[str, Any]:
    """Per-layer load, co-activation and stable partners (Dynamic-DINO's shallow-vs-deep reading).

    ``traces``: ``{layer name: (tokens, k) expert ids}`` in layer order. Shallow layers are the
    first half, deep layers the last half (the middle layer of an odd count belongs to neither).
    """
    from distillery.students.moe import (
        coactivation_matrix,
        stable_partners,
        summarise_layers,
    )

    summary = summarise_layers(traces, num_experts, threshold)
    layers: dict[str, Any] = {}
    for name, trace in traces.items():
        coact = coactivation_matrix(trace, num_experts)
        partners = stable_partners(coact, threshold)
        layers[name] = {**summary[name], "coactivation": coact.tolist(), "stable_partners": partners.tolist()}
    names = list(traces)
    half = len(names) // 2
    shallow, deep = names[:half], names[len(names) - half:]

    def mean_of(group: list[str]) -> float:
        values = [layers[n]["mean_stable_partners"] for n in group]
        return float(sum(values) / len(values)) if values else float("nan")

    return {"num_experts": num_experts, "threshold": threshold, "layers": layers, "shallow_layers": shallow,
            "deep_layers": deep, "shallow_mean_stable_partners": mean_of(shallow),
            "deep_mean_stable_partners": mean_of(deep)}


def analysis_metrics(analysis: dict[str, Any]) -> dict[str, float]:
    """The scalar part of :func:`expert_analysis`, as MLflow metric names."""
    out = {"analysis/shallow_mean_stable_partners": analysis["shallow_mean_stable_partners"],
           "analysis/deep_mean_stable_partners": analysis["deep_mean_stable_partners"]}
    for name, layer in analysis["layers"].items():
        short = name.replace("decoder.layers.", "layer").replace(".linear1", "")
        for key in ("load_cv", "mean_partners", "mean_stable_partners", "unique_combinations",
                    "top_combination_share"):
            out[f"analysis/{short}/{key}"] = float(layer[key])
    return out


def plot_expert_analysis(analysis: dict[str, Any], out_dir: str | Path, granularity: int) -> list[Path]:
    """PNG figures: load histogram per layer, co-activation heatmap per layer, stable partners."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    layers = analysis["layers"]
    names = list(layers)
    E = analysis["num_experts"]
    short = {n: n.replace("decoder.layers.", "layer ").replace(".linear1", "") for n in names}
    paths: list[Path] = []

    fig, axes = plt.subplots(len(names), 1, figsize=(max(6, E * 0.25), 2.2 * len(names)), squeeze=False)
    colours = plt.get_cmap("tab20")
    for ax, name in zip(axes[:, 0], names):
        load = np.asarray(layers[name]["load"], dtype=float)
        share = load / max(load.sum(), 1.0)
        ax.bar(range(E), share, color=[colours((e // granularity) % 20) for e in range(E)])
        ax.axhline(1.0 / E, color="k", lw=0.8, ls="--")
        ax.set_ylabel("share of routes")
        ax.set_title(f"{short[name]}: expert load (colour = copy; dashed = uniform), "
                     f"CV {layers[name]['load_cv']:.2f}", fontsize=9)
    axes[-1, 0].set_xlabel("expert (copy * k + piece)")
    fig.tight_layout()
    paths.append(out_dir / "expert_load.png")
    fig.savefig(paths[-1], dpi=90)
    plt.close(fig)

    for i, name in enumerate(names):
        coact = np.asarray(layers[name]["coactivation"], dtype=float)
        load = np.clip(np.diag(coact), 1.0, None)
        share = coact / load[:, None]          # row a: of a's activations, the share shared with b
        np.fill_diagonal(share, np.nan)
        fig, ax = plt.subplots(figsize=(5.5, 4.6))
        im = ax.imshow(share, cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
        fig.colorbar(im, ax=ax, label="P(b selected | a selected)")
        ax.set_xlabel("expert b")
        ax.set_ylabel("expert a")
        ax.set_title(f"{short[name]}: co-activation, mean stable partners "
                     f"{layers[name]['mean_stable_partners']:.2f}", fontsize=9)
        fig.tight_layout()
        paths.append(out_dir / f"coactivation_layer{i}.png")
        fig.savefig(paths[-1], dpi=90)
        plt.close(fig)

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    ax1.bar(range(len(names)), [layers[n]["mean_stable_partners"] for n in names], color="tab:blue",
            label="stable (> threshold)")
    ax1.plot(range(len(names)), [layers[n]["mean_partners"] for n in names], "o-", color="tab:red",
             label="any co-selection")
    ax1.set_xticks(range(len(names)), [short[n] for n in names], rotation=45, fontsize=8)
    ax1.set_ylabel("partners per active expert")
    ax1.set_title(f"partners per layer (threshold {analysis['threshold']:.2f}); shallow "
                  f"{analysis['shallow_mean_stable_partners']:.2f} vs deep {analysis['deep_mean_stable_partners']:.2f}",
                  fontsize=8)
    ax1.legend(fontsize=8)
    top = max([max(layers[n]["stable_partners"] or [0]) for n in names] + [1])
    bins = np.arange(top + 2) - 0.5
    for group, colour in (("shallow_layers", "tab:green"), ("deep_layers", "tab:purple")):
        counts = [c for n in analysis[group] for c, l in zip(layers[n]["stable_partners"], layers[n]["load"]) if l > 0]
        if counts:
            ax2.hist(counts, bins=bins, alpha=0.6, color=colour, label=group.replace("_", " "))
    ax2.set_xlabel("stable partners of an expert")
    ax2.set_ylabel("experts")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    paths.append(out_dir / "stable_partners.png")
    fig.savefig(paths[-1], dpi=90)
    plt.close(fig)
    return paths


