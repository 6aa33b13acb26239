"""The accuracy-vs-size report: reads the results store only, never a model.

`compress report --metric wikitext2_ppl` collects every record that has the metric, keeps those measured under one
protocol (the most common one, or `--protocol KEY`) and says how many were left out and why, marks the Pareto front
(no other point is at most as large and at least as good, with one of the two strictly), prints a table, and writes a
Markdown table and a PNG scatter plot (size on a log2 axis, perplexity on a log axis, the front drawn as a staircase).
Points are the compressed models of the runs, the uncompressed model of each run's "before" measurement, and plain
`compress eval` records (a checkpoint is labelled by the method stored in it).
"""
from __future__ import annotations

import logging
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from compress.core.errors import CompressError
from compress.core.paths import atomic_write_bytes
from compress.runs.results import read_records, store_path
from compress.runs.results import results_dir as resolve_results

log = logging.getLogger("compress")
SIZE_AXES = ("bits", "bytes")


@dataclass
class Point:
    model: str
    model_fp: str
    method: str
    setting: str
    bits_per_weight: float | None
    memory_bytes: int | None
    value: float
    stderr: float | None
    higher_is_better: bool
    protocol: dict[str, Any]
    protocol_key: str
    run_id: str
    time: str
    calibration: str = ""
    label: str = ""
    front: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def size(self, axis: str) -> float | None:
        return self.bits_per_weight if axis == "bits" else self.memory_bytes


# ---------------------------------------------------------------------------------------------------------------
# Records -> points
# ---------------------------------------------------------------------------------------------------------------
def metric_keys(metric: str) -> list[str]:
    """Spellings of one metric in records: `wikitext2_ppl` is stored as `ppl_wikitext2`, tasks as `piqa_acc`."""
    m = metric.strip()
    keys = [m]
    if m.endswith("_ppl"):
        keys.append("ppl_" + m[: -len("_ppl")])
    if m.startswith("ppl_"):
        keys.append(m[len("ppl_"):] + "_ppl")
    return keys


def _find_metric(metrics: dict[str, Any], keys: list[str]) -> dict[str, Any] | None:
    for k in keys:
        v = metrics.get(k)
        if isinstance(v, dict) and isinstance(v.get("value"), (int, float)) and math.isfinite(v["value"]):
            return v
    return None


def _higher_is_better(entry: dict[str, Any], key: str) -> bool:
    if "higher_is_better" in entry:
        return bool(entry["higher_is_better"])
    proto = entry.get("protocol") or {}
    return not (proto.get("metric") in ("perplexity", "ppl") or "ppl" in key)


def _calib(record: dict[str, Any]) -> str:
    c = record.get("calibration") or {}
    if not c:
        return ""
    return f"{c.get('dataset', '?')} {c.get('nsamples', '?')}x{c.get('seqlen', '?')}"


def _short_setting(setting: str, method: str) -> str:
    """'gptq(w4 g128)' -> 'w4 g128'; recipes keep their arrows."""
    m = re.fullmatch(re.escape(method) + r"\((.*)\)", setting or "")
    return m.group(1) if m else (setting or method)


def collect_points(records: Iterable[dict[str, Any]], metric: str, *, model: str | None = None
                   ) -> tuple[list[Point], Counter]:
    """Points of `metric` (compressed, uncompressed and plain evaluations), and why other records were left out."""
    keys = metric_keys(metric)
    left: Counter = Counter()
    points: list[Point] = []
    for rec in records:
        if not isinstance(rec, dict) or "metrics" not in rec and "status" not in rec:
            left["not a run record"] += 1
            continue
        if rec.get("status", "ok") != "ok":
            left["failed runs"] += 1
            continue
        mdl = rec.get("model") or {}
        if model and model not in (mdl.get("name"), mdl.get("spec"), mdl.get("fingerprint")):
            left[f"other models than {model}"] += 1
            continue
        metrics = rec.get("metrics") or {}
        after = _find_metric(metrics.get("after") or {}, keys)
        before = _find_metric(metrics.get("before") or {}, keys)
        if after is None and before is None:
            left[f"no {metric}"] += 1
            continue
        common = dict(model=mdl.get("name") or mdl.get("spec") or "?", model_fp=mdl.get("fingerprint") or "",
                      run_id=rec.get("run_id", ""), time=rec.get("time", ""))
        if after is not None:
            size = rec.get("size") or {}
            method, setting = rec.get("method", "none"), rec.get("setting", "")
            if rec.get("kind") == "eval":
                qc = (rec.get("checkpoint_info") or {}).get("quantization_config") or {}
                method, setting = qc.get("method") or "uncompressed", qc.get("setting") or ""
            points.append(Point(method=method, setting=setting, bits_per_weight=size.get("bits_per_weight"),
                                memory_bytes=size.get("memory_bytes"), value=float(after["value"]),
                                stderr=after.get("stderr"), higher_is_better=_higher_is_better(after, keys[0]),
                                protocol=after.get("protocol") or {}, protocol_key=after.get("protocol_key") or "",
                                calibration=_calib(rec), **common))
        if before is not None:
            size = rec.get("size_before") or {}
            points.append(Point(method="uncompressed", setting="", bits_per_weight=size.get("bits_per_weight"),
                                memory_bytes=size.get("memory_bytes"), value=float(before["value"]),
                                stderr=before.get("stderr"), higher_is_better=_higher_is_better(before, keys[0]),
                                protocol=before.get("protocol") or {}, protocol_key=before.get("protocol_key") or "",
                                **common))
    return points, left


def latest_per_setting(points: list[Point], left: Counter) -> list[Point]:
    """One point per (model, method, setting, calibration, protocol): the latest run."""
    best: dict[tuple, Point] = {}
    for p in points:
        key = (p.model_fp, p.method, p.setting, p.calibration, p.protocol_key)
        if key in best:
            left["earlier runs of the same setting (latest kept)" if p.method != "uncompressed"
                 else "repeated uncompressed measurements (latest kept)"] += 1
            if p.time < best[key].time:
                continue
        best[key] = p
    return list(best.values())


def choose_protocol(points: list[Point], left: Counter, protocol: str | None = None) -> list[Point]:
    """Keep the points measured under one protocol: `protocol` (a key or prefix), else the most common one."""
    if not points:
        return []
    counts = Counter(p.protocol_key for p in points)
    if protocol:
        match = [k for k in counts if k.startswith(protocol)]
        if len(match) != 1:
            raise CompressError(f"--protocol {protocol!r} matches {len(match)} of the protocols in the store "
                                f"({', '.join(f'{k} ({n})' for k, n in counts.most_common())})")
        chosen = match[0]
    else:
        latest = {k: max(p.time for p in points if p.protocol_key == k) for k in counts}
        chosen = max(counts, key=lambda k: (counts[k], latest[k]))
    dropped = sum(n for k, n in counts.items() if k != chosen)
    if dropped:
        left[f"measured under other protocols ({', '.join(k for k in counts if k != chosen)})"] += dropped
    return [p for p in points if p.protocol_key == chosen]


def pareto_front(points: list[Point], axis: str = "bits") -> list[Point]:
    """Mark and return the points no other point dominates: smaller-or-equal size and better-or-equal metric, one
    of the two strictly. Points without a size are never on the front."""
    sized = [p for p in points if p.size(axis) is not None]
    for p in points:
        p.front = False
    for p in sized:
        sign = 1 if p.higher_is_better else -1
        p.front = not any(
            q is not p and q.size(axis) <= p.size(axis) and sign * q.value >= sign * p.value
            and (q.size(axis) < p.size(axis) or sign * q.value > sign * p.value)
            for q in sized
        )
    return sorted((p for p in sized if p.front), key=lambda p: p.size(axis))


def _labels(points: list[Point]) -> None:
    many_models = len({p.model_fp for p in points}) > 1
    by_label = Counter((p.model_fp, p.method, p.setting) for p in points)
    for p in points:
        lab = p.method if p.method == "uncompressed" else f"{p.method} {_short_setting(p.setting, p.method)}"
        if by_label[(p.model_fp, p.method, p.setting)] > 1 and p.calibration:
            lab += f" [{p.calibration}]"
        if many_models:
            lab = f"{p.model}: {lab}"
        p.label = lab


# ---------------------------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------------------------
def describe_protocol(metric: str, protocol: dict[str, Any]) -> str:
    if protocol.get("metric") == "perplexity" or "seqlen" in protocol:
        return (f"{protocol.get('dataset', metric)} {protocol.get('variant', '')} {protocol.get('split', '')}, seqlen "
                f"{protocol.get('seqlen')}, {protocol.get('windows')}/{protocol.get('windows_total')} windows, "
                f"{protocol.get('dtype', '')}").replace("  ", " ")
    if "task" in protocol:
        return (f"lm-eval {protocol.get('lm_eval')} {protocol.get('task')} v{protocol.get('task_version')} "
                f"({protocol.get('task_definition')}), {protocol.get('metric')}, {protocol.get('items')}/"
                f"{protocol.get('items_total')} items, {protocol.get('num_fewshot')}-shot, {protocol.get('dtype')}, "
                f"batch {protocol.get('batch_size')}")
    return ", ".join(f"{k} {v}" for k, v in protocol.items() if k != "origin")


def _metric_title(metric: str, points: list[Point]) -> str:
    hib = points[0].higher_is_better if points else False
    return f"{metric} ({'higher' if hib else 'lower'} is better)"


def _fmt_mb(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.1f}"


def _fmt_value(p: Point) -> str:
    v = f"{p.value:.4f}" if abs(p.value) < 1000 else f"{p.value:.4g}"
    return v + (f" ± {p.stderr:.4f}" if p.stderr else "")


def markdown_table(points: list[Point], metric: str, axis: str, protocol_text: str, left: Counter) -> str:
    lines = [f"# {_metric_title(metric, points)} vs size", "",
             f"Protocol: {protocol_text} (key `{points[0].protocol_key}`)." if points else "No points.", "",
             "| Pareto | model | method | setting | calibration | bits/weight | size in memory (MiB) | "
             f"{metric} | run |", "|---|---|---|---|---|---:|---:|---:|---|"]
    for p in sorted(points, key=lambda p: (p.size(axis) is None, p.size(axis) or 0, p.label)):
        lines.append(f"| {'**front**' if p.front else ''} | {p.model} | {p.method} | "
                     f"{_short_setting(p.setting, p.method) if p.setting else '-'} | {p.calibration or '-'} | "
                     f"{p.bits_per_weight if p.bits_per_weight is not None else '-'} | {_fmt_mb(p.memory_bytes)} | "
                     f"{_fmt_value(p)} | {p.run_id} |")
    if left:
        lines += ["", "Left out: " + "; ".join(f"{n} {why}" for why, n in left.items()) + "."]
    lines += ["", "Bits per weight count the decoder-block linears' codes, scales, zero points and indices; size in "
                  "memory counts every tensor of the model (tied embeddings once)."]
    return "\n".join(lines) + "\n"


def plot(points: list[Point], metric: str, axis: str, protocol_text: str, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sized = [p for p in points if p.size(axis) is not None]
    if not sized:
        raise CompressError(f"no point of {metric} has a size ({axis}); nothing to plot")
    fig, ax = plt.subplots(figsize=(9, 6), dpi=130)
    methods = sorted({p.method for p in sized}, key=lambda m: (m == "uncompressed", m))
    markers = "osD^v<>phX"
    cmap = plt.get_cmap("tab10")
    xs = lambda ps: [p.size(axis) if axis == "bits" else p.size(axis) / 2**20 for p in ps]  # noqa: E731
    for i, m in enumerate(methods):
        ps = [p for p in sized if p.method == m]
        style = dict(marker="*", s=220, color="black") if m == "uncompressed" else \
            dict(marker=markers[i % len(markers)], s=60, color=cmap(i % 10))
        ax.scatter(xs(ps), [p.value for p in ps], label="mixed (compress fit)" if m == "mixed" else m, zorder=3,
                   edgecolors="white", linewidths=0.6, **style)
        if m == "mixed" and len(ps) > 1:  # the fitted plans' frontier, beside the uniform settings
            ps = sorted(ps, key=lambda p: p.size(axis))
            ax.plot(xs(ps), [p.value for p in ps], color=style["color"], lw=1.2, ls="--", zorder=2)
    front = sorted((p for p in sized if p.front), key=lambda p: p.size(axis))
    if front:
        ax.plot(xs(front), [p.value for p in front], drawstyle="steps-post", color="crimson", lw=1.6, alpha=0.8,
                zorder=2, label="Pareto front")
        ax.scatter(xs(front), [p.value for p in front], s=160, facecolors="none", edgecolors="crimson", lw=1.4,
                   zorder=4)
    for p, x in zip(sized, xs(sized)):
        text = "fp" if p.method == "uncompressed" else _short_setting(p.setting, p.method)
        # front labels right of the point, dominated ones left of it: points of equal size do not print over each other
        ax.annotate(text, (x, p.value), textcoords="offset points", xytext=(6, 5) if p.front else (-6, 5),
                    ha="left" if p.front else "right", fontsize=7.5,
                    fontweight="bold" if p.front else "normal", color="black" if p.front else "dimgray")
    if axis == "bits":
        ax.set_xscale("log", base=2)
        ticks = sorted({2, 3, 4, 5, 6, 8, 16} | {round(x) for x in xs(sized)})
        lo, hi = min(xs(sized)), max(xs(sized))
        ax.set_xticks([t for t in ticks if lo * 0.8 <= t <= hi * 1.25])
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set_xlabel("bits per weight (decoder-block linears: codes + scales + zero points) [bits]")
    else:
        ax.set_xscale("log")
        ax.set_xlabel("model size in memory [MiB] (log scale)")
    values = [p.value for p in sized]
    hib = sized[0].higher_is_better
    if not hib and min(values) > 0 and max(values) / min(values) > 5:
        ax.set_yscale("log")
        ax.set_ylabel(f"{metric} [log scale; lower is better]")
    else:
        ax.set_ylabel(f"{metric} [{'higher' if hib else 'lower'} is better]")
    models = sorted({p.model for p in sized})
    ax.set_title(f"{', '.join(models)}: {metric} vs size\n{protocol_text}", fontsize=9.5)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="best", fontsize=8.5, framealpha=0.9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
    return path


def build_report(records: list[dict[str, Any]], metric: str, *, model: str | None = None, axis: str = "bits",
                 protocol: str | None = None) -> tuple[list[Point], Counter, str]:
    if axis not in SIZE_AXES:
        raise CompressError(f"--size {axis!r} is not one of: {', '.join(SIZE_AXES)}")
    points, left = collect_points(records, metric, model=model)
    points = latest_per_setting(points, left)
    points = choose_protocol(points, left, protocol)
    if not points:
        return [], left, ""
    pareto_front(points, axis)
    _labels(points)
    return points, left, describe_protocol(metric, points[0].protocol)


def write_report(points: list[Point], left: Counter, metric: str, axis: str, protocol_text: str, out: Path
                 ) -> tuple[Path, Path]:
    md = out.with_suffix(".md")
    atomic_write_bytes(md, markdown_table(points, metric, axis, protocol_text, left).encode())
    png = plot(points, metric, axis, protocol_text, out.with_suffix(".png"))
    return md, png


def print_table(points: list[Point], metric: str, axis: str, protocol_text: str, left: Counter, console) -> None:
    from rich.table import Table

    t = Table(title=f"{_metric_title(metric, points)} vs size — {protocol_text}", title_justify="left")
    for col, just in (("front", "center"), ("model", "left"), ("method", "left"), ("setting", "left"),
                      ("calibration", "left"), ("bits/weight", "right"), ("MiB", "right"), (metric, "right"),
                      ("run", "left")):
        t.add_column(col, justify=just)
    for p in sorted(points, key=lambda p: (p.size(axis) is None, p.size(axis) or 0, p.label)):
        t.add_row("★" if p.front else "", p.model, p.method, _short_setting(p.setting, p.method) if p.setting else "-",
                  p.calibration or "-", str(p.bits_per_weight if p.bits_per_weight is not None else "-"),
                  _fmt_mb(p.memory_bytes), _fmt_value(p), p.run_id, style="bold" if p.front else None)
    console.print(t)




def report(*, metric: str, model: str | None, results_dir: str | None, axis: str, protocol: str | None,
           out: str | None, console) -> tuple[Path, Path]:
    """`compress report`: the table on the console, the Markdown table and PNG plot written. Returns their paths."""
    store = store_path(results_dir)
    records = read_records(results_dir, strict=True)
    if not records:
        raise CompressError(f"the results store {str(store)!r} holds no records; run something first")
    points, left, proto = build_report(records, metric, model=model, axis=axis, protocol=protocol)
    if not points:
        why = "; ".join(f"{n} {w}" for w, n in left.items())
        raise CompressError(f"no record in {str(store)!r} has {metric!r}" + (f" ({why})" if why else ""))
    print_table(points, metric, axis, proto, left, console)
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", metric) + (f"-{re.sub(r'[^A-Za-z0-9_.-]+', '-', model)}" if model else "")
    target = Path(out) if out else resolve_results(results_dir) / f"report-{slug}"
    md, png = write_report(points, left, metric, axis, proto, target)
    if left:
        console.print("left out: " + "; ".join(f"{n} {why}" for why, n in left.items()))
    console.print(f"{len(points)} points, {sum(p.front for p in points)} on the Pareto front · table {md} · plot {png}")
    return md, png
