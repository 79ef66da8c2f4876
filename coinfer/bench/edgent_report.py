"""The Edgent experiments' figures (PNG, matplotlib) and ``summary.md``, from the results ``coinfer.bench.edgent``
measured."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from coinfer.lab.calibration import Calibration
from coinfer.lab.traces import TRACE, trace_bps
from planner.units import format_bandwidth


def _bandwidth_or_none(bps: float | None) -> str:
    return "none" if bps is None else format_bandwidth(bps)


def _figure(title: str, emulation: dict[str, Any]) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.set_title(title, fontsize=10)
    fig.text(0.01, 0.01, f"{emulation['mode']}; device: {emulation['device_cpu']}", fontsize=6, color="gray")
    return fig, ax


def _save(fig: Any, path: Path) -> None:
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)


def plot_sweep(path: Path, xs: list[float], points: list[dict[str, Any]], xlabel: str, title: str,
                emulation: dict[str, Any]) -> None:
    fig, ax = _figure(title, emulation)
    ax.plot(xs, [p["exit"] for p in points], "o-", label="exit (1-5)")
    ax.plot(xs, [p["cut"] for p in points], "s--", label="layers on the device (cut)")
    ax.set_xlabel(xlabel)
    ax.legend()
    ax.grid(alpha=0.3)
    _save(fig, path)


def plot_latency(path: Path, points: list[dict[str, Any]], deadline: float, emulation: dict[str, Any]) -> None:
    fig, ax = _figure("Predicted vs measured end-to-end latency", emulation)
    xs = [p["bps"] / 1e3 for p in points]
    ax.plot(xs, [p["predicted_ms"] for p in points], "o-", label="predicted (median)")
    ax.plot(xs, [p["p50_ms"] for p in points], "s-", label="measured p50")
    ax.plot(xs, [p["p95_ms"] for p in points], "^:", label="measured p95")
    ax.axhline(deadline * 1e3, color="red", lw=0.8, label="deadline")
    ax.set_xlabel("uplink (kbps)")
    ax.set_ylabel("ms")
    ax.set_xscale("log")
    ax.legend()
    ax.grid(alpha=0.3)
    _save(fig, path)


def plot_methods(path: Path, table: dict[str, list[dict[str, Any]]], bps: float,
                  emulation: dict[str, Any]) -> None:
    fig, ax = _figure(f"Accuracy vs deadline at {format_bandwidth(bps)} (a miss counts as a failure)", emulation)
    for m, rows in table.items():
        ax.plot([r["deadline_s"] * 1e3 for r in rows], [r["accuracy"] for r in rows], "o-", label=m)
    ax.set_xlabel("deadline (ms)")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.legend()
    ax.grid(alpha=0.3)
    _save(fig, path)


def plot_oracle(path: Path, result: dict[float, dict[str, Any]], emulation: dict[str, Any]) -> None:
    fig, ax = _figure("coinfer vs the best measured plan at the same exit", emulation)
    xs = np.arange(len(result))
    ax.bar(xs - 0.2, [v["coinfer_s"] * 1e3 for v in result.values()], 0.4, label="coinfer (median)")
    ax.bar(xs + 0.2, [v["oracle_s"] * 1e3 for v in result.values()], 0.4,
           label="oracle (best measured plan, in turns with coinfer)")
    ax.set_xticks(xs, [format_bandwidth(b) for b in result])
    ax.set_ylabel("ms")
    ax.legend()
    _save(fig, path)


def plot_trace(path: Path, doc: dict[str, Any], emulation: dict[str, Any]) -> None:
    fig, ax = _figure("Changing bandwidth: re-planning per request vs a plan fixed at start", emulation)
    ts = np.linspace(0, TRACE[-1][0], 400)
    ax2 = ax.twinx()
    ax2.plot(ts, [trace_bps(t) / 1e3 for t in ts], color="gray", lw=0.8)
    ax2.set_yscale("log")
    ax2.set_ylabel("uplink (kbps)", color="gray")
    for mode, style in (("coinfer", "."), ("fixed", "x")):
        recs = doc[mode]["records"]
        ax.plot([r["t"] for r in recs], [r["latency_s"] * 1e3 for r in recs], style, ms=3,
                label=f"{mode}: hit {doc[mode]['hit_rate']:.0%}, acc {doc[mode]['accuracy']:.2f}")
    ax.axhline(doc["deadline_s"] * 1e3, color="red", lw=0.8)
    ax.set_yscale("log")
    ax.set_xlabel("s")
    ax.set_ylabel("latency (ms)")
    ax.legend(loc="upper left", fontsize=8)
    _save(fig, path)


def write_markdown(out: Path, summary: dict[str, Any], calib: Calibration, methods: Sequence[str]) -> None:
    """``summary.md``: the emulation, the calibration, the headline numbers and Fig. 9's table."""
    e = summary["emulation"]
    lines = ["# coinfer: the Edgent experiments on the emulated testbed", "",
             f"Regenerate: `{summary.get('regenerate', 'sudo .venv/bin/coinfer bench edgent --out DIR')}`", "",
             "## Emulation", *[f"- {k}: {v}" for k, v in e.items()],
             f"- model: {summary['model']} (policy {summary.get('policy', 'edgent')}); device-only exit "
             f"{summary.get('exits', 5)} measured {summary['device_full_s'] * 1e3:.0f} ms (the paper's Pi 3: over "
             f"2 s). The deadlines are the paper's own, unscaled; the model's input is "
             f"{summary.get('input_bytes', 12544) / 1024:.1f} KB (the paper's: 12 KB)", "",
             "## Calibration (per-layer |predicted - measured| / measured on the bundle's layers)", ""]
    for side in ("edge", "device"):
        c = calib.profiles[side]
        lines.append(f"- {side}: median {c['layer_error']['p50']:.0%}, p95 {c['layer_error']['p95']:.0%} over "
                     f"{c['layer_error']['layers']} layers; whole bundle predicted "
                     f"{c['bundle_run']['predicted_s'] * 1e3:.2f} ms vs measured "
                     f"{c['bundle_run']['measured_s'] * 1e3:.2f} ms")
    st = calib.device_stages or {}
    quota = st.get("cpu_quota")
    lines += [f"- device model used by the planner: the edge's per-layer model x {st['slowdown']:.2f} + "
              f"{st['stage_overhead_s'] * 1e3:.1f} ms per stage"
              + (f", each stage throttled by the CPU quota ({quota['quota_s'] * 1e3:g} ms per "
                 f"{quota['period_s'] * 1e3:g} ms, `planner.latency.CpuQuota`)" if quota else "")
              + f"; fitted to {len(st['stages'])} head stages timed on the device (the per-layer profile under a "
              f"CPU quota does not add up to whole stages); whole-stage error median {st['error_p50']:.0%}, "
              f"p95 {st['error_p95']:.0%}"]
    pe = summary["prediction_error"]
    lines += ["", "## Headline", "",
              f"- end-to-end prediction error (coinfer requests of Figs. 6-8 that did not fall back, "
              f"n={pe['requests']}): "
              f"median {pe['p50']:.1%}, p95 {pe['p95']:.1%}; within 10%: {pe['within_10pct']:.0%} of requests "
              f"(the best any prediction could do on these measurements: "
              f"{pe['within_10pct_best_possible']:.0%})",
              *[f"  - plans run {w}: median {v['p50']:.1%}, p95 {v['p95']:.1%}, within 10% {v['within_10pct']:.0%} "
                f"(best possible {v['within_10pct_best_possible']:.0%}; n={v['requests']}); median measured - "
                f"predicted: " + ", ".join(f"{k} {b:+.1f} ms" for k, b in v["bias_ms"].items())
                for w, v in pe["by_where"].items() if v["requests"]],
              *[f"  - plans {k}: median {v['p50']:.1%}, within 10% {v['within_10pct']:.0%} (best possible "
                f"{v['within_10pct_best_possible']:.0%}; n={v['requests']}); median measured - predicted: "
                + ", ".join(f"{part} {b:+.1f} ms" for part, b in v["bias_ms"].items())
                for k, v in pe.get("by_plan", {}).items() if v["requests"]],
              "- coinfer / oracle at equal accuracy: " + ", ".join(f"{k} {v:.2f}"
                                                                   for k, v in summary["oracle_ratio"].items()),
              "", "## Fig. 9 data: deadline-hit rate / accuracy", "",
              "coinfer plans against margins learned from its recent overruns (deviced's `plan_quantile`, 0.9); "
              "coinfer_point is the same planner on the point prediction alone, Edgent's rule.", "",
              "| deadline ms | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
    table = summary["fig9"]["table"]
    for i, row in enumerate(table["coinfer"]):
        lines.append(f"| {row['deadline_s'] * 1e3:.1f} | " + " | ".join(
            f"{table[m][i]['hit_rate']:.0%} / {table[m][i]['accuracy']:.2f}" for m in methods) + " |")
    t = summary["trace"]
    lines += ["", f"## Trace (deadline {t['deadline_s'] * 1e3:.0f} ms)", "",
              f"- coinfer (re-plans per request): hit {t['coinfer']['hit_rate']:.1%}, accuracy "
              f"{t['coinfer']['accuracy']:.3f} over {t['coinfer']['requests']} requests",
              f"- plan fixed at start: hit {t['fixed']['hit_rate']:.1%}, accuracy {t['fixed']['accuracy']:.3f} over "
              f"{t['fixed']['requests']} requests",
              f"- {format_bandwidth(t['drop']['from_bps'])} -> {format_bandwidth(t['drop']['to_bps'])} drop at "
              f"{t['drop']['at_s']:g} s noticed (estimate within 2x) after {t['notice_drop']['seconds']} s, "
              f"{t['notice_drop']['requests']} requests (estimate just before the drop: "
              f"{_bandwidth_or_none(t['notice_drop']['estimate_before_bps'])})", "",
              "![plan vs bandwidth](fig6_bandwidth_plan.png) ![latency](fig7_latency.png)",
              "![plan vs deadline](fig8_deadline_plan.png) ![methods](fig9_accuracy.png)",
              "![oracle](oracle.png) ![trace](trace.png)", ""]
    (out / "summary.md").write_text("\n".join(lines))
