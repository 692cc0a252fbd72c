"""``adapters-evaluate``: the shared embedding versus per-task baselines, on one data set.

Example (MovieLens-100K, embeddings exported to a file):

    adapters-evaluate --embeddings ml100k.npz --movielens DATA/movielens-100k \\
        --json results.json --plots plots/
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from downstream_adapters.client import EmbeddingClient
from downstream_adapters.evaluate import baselines, cost, plots, scenarios
from downstream_adapters.evaluate.data import (
    EmbeddingSet,
    Tables,
    fetch_from_service,
    read_movielens_100k,
    read_npz,
    read_npz_extras,
    read_tables,
)
from downstream_adapters.evaluate.harness import Features, Task, run_table
from downstream_adapters.heads.ood import DEFAULT_METHOD

EMBEDDING_ROW = "embedding (LR)"
BASELINE_ROWS = ("raw items (LR)", "svd-64 (LR)", "aggregates (LR)", "random-64 (LR)")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="adapters-evaluate", description=__doc__.split("\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--embeddings", type=Path, help=".npz of a published version's users")
    source.add_argument("--service", help="base URL of a running embedding service")
    parser.add_argument("--version", help="version to read from --service (pin one)")
    parser.add_argument(
        "--api-key", default=os.environ.get("ADAPTERS_API_KEY"), help="or ADAPTERS_API_KEY"
    )
    data = parser.add_mutually_exclusive_group(required=True)
    data.add_argument("--movielens", type=Path, help="MovieLens-100K folder (u.data, u.user, ...)")
    data.add_argument("--events", type=Path, help="events CSV: user_id,item_id,timestamp[,weight]")
    parser.add_argument("--batch-size", type=int, default=1000, help="ids per batch request")
    parser.add_argument("--labels", type=Path, help="labels CSV: user_id plus one column per task")
    parser.add_argument("--items", type=Path, help="items CSV: item_id,categories (a|b)")
    parser.add_argument("--tasks", help="comma-separated label columns (default: all)")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shots", default="1,5,10,20", help="labelled users per class")
    parser.add_argument("--repeats", type=int, default=5, help="draws per few-shot setting")
    parser.add_argument(
        "--no-scenarios", action="store_true", help="only the main table (no scenarios, no cost)"
    )
    parser.add_argument(
        "--ood",
        type=Path,
        help=".npz with ood_<case> embeddings of the same version (default: the --embeddings file)",
    )
    parser.add_argument("--json", type=Path, help="write every figure here")
    parser.add_argument("--plots", type=Path, help="folder for PNG plots")
    args = parser.parse_args(argv)
    if args.events is not None and args.labels is None:
        parser.error("--events needs --labels")
    return args


def load(args: argparse.Namespace) -> tuple[Tables, EmbeddingSet]:
    if args.movielens is not None:
        tables = read_movielens_100k(args.movielens)
    else:
        tables = read_tables(args.events, args.labels, args.items)
    if args.embeddings is not None:
        return tables, read_npz(args.embeddings)
    with EmbeddingClient(
        args.service, version=args.version, api_key=args.api_key, batch_size=args.batch_size
    ) as client:
        return tables, fetch_from_service(client, sorted(tables.labels.index))


def representations(tables: Tables, users: list[str], seed: int) -> dict[str, Features]:
    return {
        "raw items (LR)": baselines.raw_items(tables, users),
        "svd-64 (LR)": baselines.svd(tables, users, seed=seed),
        "aggregates (LR)": baselines.aggregates(tables, users),
        "random-64 (LR)": baselines.random_control(users, seed=seed),
    }


def comparisons(results: dict[str, Any], tasks: list[Task]) -> list[dict[str, Any]]:
    """Each embedding row's primary metric against every baseline row, per task."""
    out = []
    for task in tasks:
        metric = task.primary
        for row in results:
            if row in BASELINE_ROWS:
                continue
            for baseline in BASELINE_ROWS:
                mine, theirs = results[row][task.name][metric], results[baseline][task.name][metric]
                out.append(
                    {
                        "task": task.name,
                        "metric": metric,
                        "model": row,
                        "value": mine,
                        "baseline": baseline,
                        "baseline_value": theirs,
                        "delta": mine - theirs,
                    }
                )
    return out


def print_table(results: dict[str, Any], tasks: list[Task]) -> None:
    header = f"{'representation / head':<28}" + "".join(
        f"{t.name + ' ' + t.primary:>22}" for t in tasks
    )
    print(header)
    print("-" * len(header))
    for row, by_task in results.items():
        cells = "".join(
            f"{by_task[t.name][t.primary]:>14.3f} ± {by_task[t.name][t.primary + '_std']:.3f}"
            for t in tasks
        )
        print(f"{row:<28}{cells}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    tables, embeddings = load(args)
    names = args.tasks.split(",") if args.tasks else list(tables.labels.columns)
    labelled = tables.labels[names].dropna()
    users = [u for u in labelled.index if u in set(embeddings.user_ids)]
    tasks = [Task(n, labelled.loc[users, n].astype(str).to_numpy()) for n in names]
    x = embeddings.align(users)
    outliers, state_bytes = ({}, None) if args.no_scenarios else extras(args, embeddings, users)
    reps = {EMBEDDING_ROW: x, **representations(tables, users, args.seed)}
    print(
        f"{len(users)} users, {len(tasks)} tasks, {args.folds}-fold CV, version "
        f"{embeddings.pin.version} ({embeddings.pin.dim} dims)",
        file=sys.stderr,
    )
    results = run_table(reps, x, tasks, k=args.folds, seed=args.seed)
    print_table(results, tasks)
    report: dict[str, Any] = {
        "pin": vars(embeddings.pin),
        "n_users": len(users),
        "folds": args.folds,
        "seed": args.seed,
        "tasks": {t.name: {"primary": t.primary, "classes": len(np.unique(t.y))} for t in tasks},
        "results": results,
        "comparisons": comparisons(results, tasks),
    }
    if not args.no_scenarios:
        report["scenarios"] = run_scenarios(args, x, reps, tasks)
        if outliers:
            report["scenarios"]["ood"] = run_ood(args, x, outliers, tasks)
        rows = cost.measure(tables, users, x, tasks, state_bytes=state_bytes, seed=args.seed)
        print_cost(rows, len(tasks))
        report["cost"] = {
            "n_tasks": len(tasks),
            "rows": rows,
            "comparisons": cost.comparisons(rows),
        }
    report["seconds"] = time.perf_counter() - started
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
    if args.plots:
        args.plots.mkdir(parents=True, exist_ok=True)
        plots.main_table(results, {t.name: t.primary for t in tasks}, args.plots / "main.png")
        if "scenarios" in report:
            plots.few_shot(report["scenarios"]["few_shot"], args.plots / "few_shot.png")
            plots.imbalance(report["scenarios"]["imbalance"], args.plots / "imbalance.png")
            if "ood" in report["scenarios"]:
                ood = report["scenarios"]["ood"]
                plots.ood(ood["results"], ood["target"], args.plots / "ood.png")
            plots.cost(report["cost"]["rows"], args.plots / "cost.png")
    return 0


def run_scenarios(
    args: argparse.Namespace, x: np.ndarray, reps: dict[str, Features], tasks: list[Task]
) -> dict[str, Any]:
    shots = tuple(int(k) for k in args.shots.split(","))
    raw = {k: reps[k] for k in ("raw items (LR)", "svd-64 (LR)")}
    few: dict[str, Any] = {}
    imbalanced: dict[str, Any] = {}
    for task in tasks:
        few[task.name] = scenarios.few_shot(
            x,
            {k.removesuffix(" (LR)"): v for k, v in raw.items()},
            task,
            shots=shots,
            repeats=args.repeats,
            seed=args.seed,
        )
        imbalanced[task.name] = scenarios.imbalance(
            x, reps["raw items (LR)"], task, k=args.folds, seed=args.seed
        )
        print_scenario(task.name, few[task.name], imbalanced[task.name], shots)
    return {"few_shot": few, "imbalance": imbalanced}


def print_scenario(
    task: str, few: dict[str, Any], imbalanced: dict[str, Any], shots: tuple[int, ...]
) -> None:
    print(f"\n{task}: data insufficiency, balanced accuracy by labelled users per class")
    print(f"{'method':<22}" + "".join(f"{'k=' + str(k):>10}" for k in shots))
    for method, by_k in few.items():
        print(f"{method:<22}" + "".join(f"{by_k[str(k)]:>10.3f}" for k in shots))
    print(f"\n{task}: class imbalance")
    print(f"{'method':<40}{'balanced acc':>14}{'macro-F1':>10}")
    for method, values in imbalanced.items():
        print(f"{method:<40}{values['balanced_accuracy']:>14.3f}{values['macro_f1']:>10.3f}")


def extras(
    args: argparse.Namespace, embeddings: EmbeddingSet, users: list[str]
) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """OOD embeddings (from ``--ood``, else the embeddings file), checked against the version's
    width, and the service's state size for ``users`` when the embeddings file records it."""
    outliers: dict[str, np.ndarray] = {}
    state_bytes = None
    if args.embeddings is not None:
        outliers, sizes = read_npz_extras(args.embeddings)
        if sizes is not None:
            rows = {u: i for i, u in enumerate(embeddings.user_ids)}
            state_bytes = sizes[[rows[u] for u in users]]
    if args.ood is not None:
        outliers, _ = read_npz_extras(args.ood)
        if not outliers:
            raise SystemExit(f"--ood: {args.ood} holds no ood_<case> arrays")
    for case, x in outliers.items():
        if x.ndim != 2 or x.shape[1] != embeddings.pin.dim:
            raise SystemExit(
                f"--ood: ood_{case} has shape {x.shape}, the version has {embeddings.pin.dim} dims"
            )
    return outliers, state_bytes


def run_ood(
    args: argparse.Namespace, x: np.ndarray, outliers: dict[str, np.ndarray], tasks: list[Task]
) -> dict[str, Any]:
    results = {t.name: scenarios.ood(x, outliers, t, k=args.folds, seed=args.seed) for t in tasks}
    for task, rows in results.items():
        print(
            f"\n{task}: OOD AUROC, held-out real users vs each case (target "
            f"{scenarios.OOD_TARGET} on {', '.join(scenarios.OOD_TARGET_CASES)} for the "
            f"default score, {DEFAULT_METHOD})"
        )
        cases = list(next(iter(rows.values())))
        print(f"{'head, score':<30}" + "".join(f"{c:>16}" for c in cases))
        for row, by_case in rows.items():
            cells = "".join(f"{v['auroc']:>9.3f} {_mark(v['held']):>6}" for v in by_case.values())
            print(f"{row:<30}{cells}")
    return {
        "target": scenarios.OOD_TARGET,
        "target_cases": list(scenarios.OOD_TARGET_CASES),
        "default_method": DEFAULT_METHOD,
        "cases": {case: len(v) for case, v in outliers.items()},
        "results": results,
    }


def _mark(held: bool | None) -> str:
    return "" if held is None else ("held" if held else "missed")


def print_cost(rows: dict[str, dict[str, Any]], n_tasks: int) -> None:
    print(f"\ninfrastructure cost of {n_tasks} tasks (CPU: all {n_tasks} predictions per user)")
    print(
        f"{'pipeline':<36}{'models':>7}{'features B/user':>17}{'state B/user':>14}"
        f"{'stored B/user':>15}{'model bytes':>13}{'CPU us/user':>13}"
    )
    for name, r in rows.items():
        state = r["service_state_bytes_per_user"]
        print(
            f"{name:<36}{r['n_models']:>7}{r['feature_bytes_per_user']:>17.0f}"
            f"{'-' if state is None else f'{state:.0f}':>14}{r['stored_bytes_per_user']:>15.0f}"
            f"{r['model_bytes']:>13}{r['cpu_us_per_user']:>13.1f}"
        )
