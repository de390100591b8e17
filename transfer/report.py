"""`mocobench report RUN_DIR... [--out DIR]`: the paper's transfer tables from detectron2 output directories.

A *run* is one detectron2 output directory (one seed). Its final evaluation is read from `results.json`
(written by `mocobench transfer`) or, for a plain detectron2 directory, from the last `metrics.json` line
carrying `bbox/AP` (what detectron2's EvalHook logs). Runs are grouped by task (the test dataset) and by
initialisation (`init` in results.json, else a name derived from MODEL.WEIGHTS in config.yaml), and each
cell is mean ± sample std over seeds with n. Deltas are against the `supervised` row, as in the MoCo
paper's tables; a delta smaller than the combined std sqrt(s_a^2 + s_b^2) is marked as within noise.
Directories with training logs but no final evaluation are listed as incomplete, never averaged.
"""
import argparse
import json
import math
import os
from collections import defaultdict

from mocobench.errors import UsageError

VOC_COLUMNS = [("bbox", "AP50"), ("bbox", "AP"), ("bbox", "AP75")]
COCO_COLUMNS = [("bbox", "AP"), ("bbox", "AP50"), ("bbox", "AP75"), ("segm", "AP"), ("segm", "AP50"), ("segm", "AP75")]
BASELINE = "supervised"
INIT_ORDER = ["random", BASELINE, "moco"]  # the paper's row order; other names follow alphabetically


def _read_json_lines(path):
    rows = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if line:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    # a run killed mid-write leaves a torn last line: that run is incomplete, not broken
                    rows.append({"_torn_line": n})
    return rows


def _eval_from_metrics(rows):
    """Nested {task: {metric: value}} from the last metrics.json line that has bbox/AP."""
    for row in reversed(rows):
        if "bbox/AP" in row:
            out = defaultdict(dict)
            for key, value in row.items():
                if "/" in key and key.split("/")[0] in ("bbox", "segm"):
                    task, metric = key.split("/", 1)
                    out[task][metric] = value
            return dict(out)
    return None


def _init_from_weights(weights: str) -> str:
    if not weights:
        return "random"
    name = os.path.splitext(os.path.basename(weights))[0].lower()
    if "moco" in name:
        return "moco"
    if any(k in name for k in ("torchvision", "supervised", "r-50", "msra", "resnet")):
        return BASELINE
    return name


def _read_config(run_dir):
    path = os.path.join(run_dir, "config.yaml")
    if not os.path.exists(path):
        return {}
    import yaml

    with open(path) as f:
        return yaml.safe_load(f) or {}


def _read_results(path):
    """results.json as a dict, or a one-line UsageError naming the file (random bytes, a torn write, a list)."""
    try:
        with open(path, encoding="utf-8") as f:
            res = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UsageError(f"{path}: not a readable results file (truncated or another format?): {e}") from None
    if not isinstance(res, dict) or not isinstance(res.get("results", res), dict):
        raise UsageError(f"{path}: expected a JSON object with the evaluation results, got a "
                         f"{type(res).__name__}")
    return res


def load_run(run_dir):
    """One seed's outcome: dict(dir, task, init, seed, eval) or dict(..., eval=None, why=...) if incomplete."""
    results_path = os.path.join(run_dir, "results.json")
    metrics_path = os.path.join(run_dir, "metrics.json")
    cfg = _read_config(run_dir)
    model_cfg, data_cfg = cfg.get("MODEL", {}), cfg.get("DATASETS", {})
    run = {
        "dir": run_dir,
        "task": (data_cfg.get("TEST") or ["?"])[0],
        "init": _init_from_weights(model_cfg.get("WEIGHTS", "")),
        "seed": cfg.get("SEED"),
        "eval": None,
    }
    if os.path.exists(results_path):
        res = _read_results(results_path)
        evaluation = res.get("results", res)
        run["eval"] = {k: v for k, v in evaluation.items() if k in ("bbox", "segm")} or None
        run["task"] = res.get("dataset", run["task"])
        run["init"] = res.get("init") or run["init"]
        run["seed"] = res.get("seed", run["seed"])
        if run["eval"] is None:
            run["why"] = f"{results_path} holds no bbox/segm results"
    elif os.path.exists(metrics_path):
        rows = _read_json_lines(metrics_path)
        if not any("total_loss" in r or "bbox/AP" in r for r in rows):
            return None  # not a detectron2 run (a pretraining run also has config.yaml + metrics.json)
        run["eval"] = _eval_from_metrics(rows)
        if run["eval"] is None:
            run["why"] = "metrics.json has no final evaluation (training unfinished or evaluation failed)"
    else:
        return None
    return run


def find_runs(paths):
    runs = []
    for top in paths:
        if not os.path.isdir(top):
            raise UsageError(f"{top!r} is not a directory")
        found = []
        for dirpath, dirnames, files in os.walk(top):
            dirnames.sort()
            if "results.json" in files or ("metrics.json" in files and "config.yaml" in files):
                run = load_run(dirpath)
                if run is not None:
                    found.append(run)
        if not found and not find_pretrain_metrics([top]):
            raise UsageError(
                f"no detectron2 results under {top!r}: expected run directories holding results.json "
                "(mocobench transfer) or metrics.json + config.yaml with a final evaluation (detectron2), "
                "or a MoCo pretraining metrics.json (for pretrain.png)"
            )
        runs += found
    return runs


def _stats(values):
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return {"mean": mean, "std": std, "n": n, "values": values}


def _row_order(init):
    return (INIT_ORDER.index(init), "") if init in INIT_ORDER else (len(INIT_ORDER), init)


def summarize(runs):
    """{task: {"columns": [...], "rows": {init: {col: stats}}, "seeds": {init: [...]}}, "incomplete": [...]}."""
    complete = [r for r in runs if r["eval"]]
    tables = {}
    by_task = defaultdict(list)
    for r in complete:
        by_task[r["task"]].append(r)
    for task, task_runs in sorted(by_task.items()):
        has_segm = any("segm" in r["eval"] for r in task_runs)
        is_voc = all(set(r["eval"]["bbox"]) <= {"AP", "AP50", "AP75"} for r in task_runs) and not has_segm
        columns = VOC_COLUMNS if is_voc else [c for c in COCO_COLUMNS if has_segm or c[0] == "bbox"]
        rows, seeds = {}, {}
        for init in sorted({r["init"] for r in task_runs}, key=_row_order):
            members = [r for r in task_runs if r["init"] == init]
            rows[init] = {
                f"{t}/{m}": _stats([r["eval"][t][m] for r in members if m in r["eval"].get(t, {})])
                for t, m in columns
            }
            seeds[init] = [r["seed"] for r in members]
        tables[task] = {"columns": [f"{t}/{m}" for t, m in columns], "rows": rows, "seeds": seeds}
    incomplete = [{"dir": r["dir"], "why": r.get("why", "")} for r in runs if not r["eval"]]
    return {"tables": tables, "incomplete": incomplete}


def _delta(cell, base):
    diff = cell["mean"] - base["mean"]
    combined = math.sqrt(cell["std"] ** 2 + base["std"] ** 2)
    return diff, abs(diff) < combined


def _column_title(col):
    task, metric = col.split("/")
    prefix = {"bbox": "AP^bb", "segm": "AP^mk"}[task]
    return prefix + metric[2:] if metric != "AP" else prefix


def to_markdown(summary) -> str:
    out = ["# Transfer results", ""]
    for task, table in summary["tables"].items():
        cols = table["columns"]
        voc = all(c.startswith("bbox/") for c in cols) and len(cols) == 3
        titles = [c.split("/")[1] for c in cols] if voc else [_column_title(c) for c in cols]
        out += [f"## {task}", "", "| pre-train | " + " | ".join(titles) + " |",
                "|---|" + "---|" * len(cols)]
        base = table["rows"].get(BASELINE)
        noisy = False
        for init, cells in table["rows"].items():
            parts = []
            for c in cols:
                s = cells[c]
                if not s["n"]:
                    parts.append("–")
                    continue
                text = f"{s['mean']:.1f} ± {s['std']:.1f} (n={s['n']})"
                if base is not None and init != BASELINE and base[c]["n"]:
                    diff, within = _delta(s, base[c])
                    text += f" ({diff:+.1f}{'†' if within else ''})"
                    noisy |= within
                parts.append(text)
            out.append(f"| {init} | " + " | ".join(parts) + " |")
        out.append("")
        if base is not None:
            out.append(f"Mean ± sample std over seeds; (±x) is the difference to the {BASELINE} row.")
            if noisy:
                out.append("† the difference is smaller than the combined std sqrt(s1² + s2²): within seed noise.")
        else:
            out.append(f"Mean ± sample std over seeds (no `{BASELINE}` row, so no deltas).")
        out.append("")
    if summary["incomplete"]:
        out += ["## Incomplete runs (not averaged)", ""]
        out += [f"- `{r['dir']}`: {r['why']}" for r in summary["incomplete"]]
        out.append("")
    return "\n".join(out)


def plot_ap(summary, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tables = summary["tables"]
    fig, axes = plt.subplots(1, len(tables), figsize=(6 * len(tables), 4), squeeze=False)
    for ax, (task, table) in zip(axes[0], tables.items()):
        inits = list(table["rows"])
        width = 0.8 / max(len(inits), 1)
        for i, init in enumerate(inits):
            cells = [table["rows"][init][c] for c in table["columns"]]
            xs = [j + (i - (len(inits) - 1) / 2) * width for j in range(len(cells))]
            ax.bar(xs, [c["mean"] for c in cells], width, yerr=[c["std"] for c in cells], capsize=3,
                   label=f"{init} (n={cells[0]['n']})")
        ax.set_xticks(range(len(table["columns"])))
        ax.set_xticklabels(table["columns"], rotation=20)
        ax.set_title(task)
        ax.set_ylabel("AP (%)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def find_pretrain_metrics(paths):
    """metrics.json files of MoCo pretraining runs under the given directories."""
    found = []
    for top in paths:
        for dirpath, dirnames, files in os.walk(top):
            dirnames.sort()
            if "metrics.json" in files:
                rows = _read_json_lines(os.path.join(dirpath, "metrics.json"))
                if any("moco_m" in r for r in rows):  # MoCo runs log the key-encoder momentum
                    found.append((dirpath, rows))
    return found


def pretrain_curves(rows):
    """Per-epoch mean loss and acc@1, and kNN top-1 where measured."""
    per_epoch = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if "epoch" not in r:
            continue
        for key in ("loss", "acc1", "knn_top1"):
            if key in r:
                per_epoch[r["epoch"]][key].append(r[key])
    curves = defaultdict(list)
    for epoch in sorted(per_epoch):
        for key, values in per_epoch[epoch].items():
            curves[key].append((epoch, sum(values) / len(values)))
    return dict(curves)


def plot_pretrain(found, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 3.6))
    for run_dir, rows in found:
        curves = pretrain_curves(rows)
        label = os.path.basename(os.path.normpath(run_dir))
        for ax, key, title in zip(axes, ("loss", "acc1", "knn_top1"),
                                  ("InfoNCE loss", "contrastive acc@1 (%)", "kNN top-1 (%)")):
            if curves.get(key):
                xs, ys = zip(*curves[key])
                ax.plot(xs, ys, marker="o", label=label)
            ax.set_title(title)
            ax.set_xlabel("epoch")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(paths, out_dir) -> dict:
    from mocobench.fileio import atomic_write

    summary = summarize(find_runs(paths))
    os.makedirs(out_dir, exist_ok=True)
    markdown = to_markdown(summary)
    with atomic_write(os.path.join(out_dir, "report.md"), "w") as f:
        f.write(markdown)
    with atomic_write(os.path.join(out_dir, "report.json"), "w") as f:
        json.dump(summary, f, indent=2)
    files = ["report.md", "report.json"]
    if summary["tables"]:
        plot_ap(summary, os.path.join(out_dir, "ap.png"))
        files.append("ap.png")
    pretrain = find_pretrain_metrics(paths)
    if pretrain:
        plot_pretrain(pretrain, os.path.join(out_dir, "pretrain.png"))
        files.append("pretrain.png")
    summary["markdown"] = markdown
    summary["files"] = [os.path.join(out_dir, f) for f in files]
    return summary


def main(argv) -> int:
    parser = argparse.ArgumentParser(prog="mocobench report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="detectron2 output directories (searched)")
    parser.add_argument("--out", default=None, help="where to write report.md/.json and the plots "
                        "(default: the first RUN_DIR)")
    args = parser.parse_args(argv)
    summary = write_report(args.run_dirs, args.out or args.run_dirs[0])
    print(summary["markdown"])
    print("wrote " + ", ".join(summary["files"]))
    return 0
