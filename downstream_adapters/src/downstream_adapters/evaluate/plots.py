"""PNG figures of the harness results (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main_table(
    results: dict[str, dict[str, dict[str, float]]], primary: dict[str, str], out: Path
) -> None:
    """One bar group per task: each row's primary metric with its fold standard deviation."""
    tasks = list(primary)
    rows = list(results)
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 4.5), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        metric = primary[task]
        values = [results[r][task][metric] for r in rows]
        errors = [results[r][task][f"{metric}_std"] for r in rows]
        ax.barh(rows, values, xerr=errors, color="tab:blue")
        ax.set_title(f"{task} ({metric})")
        ax.set_xlim(min(values) * 0.9, max(values) * 1.05)
        ax.invert_yaxis()
    for ax in axes[0][1:]:
        ax.set_yticklabels([])
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def few_shot(results: dict[str, dict[str, dict[str, float]]], out: Path) -> None:
    """Balanced accuracy against labelled users per class, one panel per task."""
    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 4), squeeze=False)
    for ax, (task, methods) in zip(axes[0], results.items(), strict=True):
        for method, by_k in methods.items():
            ks = [k for k in by_k if not k.endswith("_std")]
            ax.errorbar(
                [int(k) for k in ks],
                [by_k[k] for k in ks],
                yerr=[by_k[f"{k}_std"] for k in ks],
                marker="o",
                capsize=3,
                label=method,
            )
        ax.set_xscale("log")
        ax.set_xlabel("labelled users per class")
        ax.set_ylabel("balanced accuracy")
        ax.set_title(task)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def imbalance(results: dict[str, Any], out: Path) -> None:
    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 3.5), squeeze=False)
    for ax, (task, methods) in zip(axes[0], results.items(), strict=True):
        names = list(methods)
        ax.barh(names, [methods[n]["balanced_accuracy"] for n in names], color="tab:green")
        ax.set_title(f"{task}: balanced accuracy")
        ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def ood(results: dict[str, dict[str, dict[str, dict[str, Any]]]], target: float, out: Path) -> None:
    """AUROC per score and OOD case, one panel per task, with the target as a line."""
    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.5), squeeze=False)
    for ax, (task, rows) in zip(axes[0], results.items(), strict=True):
        names = list(rows)
        cases = list(next(iter(rows.values())))
        height = 0.8 / len(cases)
        for i, case in enumerate(cases):
            positions = [j + i * height for j in range(len(names))]
            ax.barh(positions, [rows[n][case]["auroc"] for n in names], height, label=case)
        ax.set_yticks([j + 0.4 - height / 2 for j in range(len(names))], names)
        ax.axvline(target, color="black", linestyle="--", linewidth=1)
        ax.set_xlim(0.0, 1.0)
        ax.set_title(f"{task}: OOD AUROC")
        ax.invert_yaxis()
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def cost(rows: dict[str, dict[str, Any]], out: Path) -> None:
    """Stored bytes per user and CPU per user for N tasks, per pipeline."""
    names = list(rows)
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.5))
    for ax, figure, label in (
        (axes[0], "stored_bytes_per_user", "stored bytes per user"),
        (axes[1], "cpu_us_per_user", "CPU µs per user (all tasks)"),
    ):
        ax.barh(names, [rows[n][figure] for n in names], color="tab:purple")
        ax.set_xscale("log")
        ax.set_title(label)
        ax.invert_yaxis()
    axes[1].set_yticklabels([])
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
