"""The evaluation report: the table, the verdict, eval.json / eval.md / eval.png, and their copies in the adapter store.

Reads an `EvalResult` (`lorag.evaluation.evaluate`); `lorag eval`, `jobs.evaluate` and the
quickstart print and write it. The routing report is `lorag.routing_eval.routing_markdown`.
"""

from __future__ import annotations

import json
from pathlib import Path

from lorag.evaluation import METRICS, EvalResult, VariantSummary
from lorag.metrics import Interval

LABELS = {
    "exact_match": "exact match", "f1": "token F1", "contains": "contains answer", "choice_accuracy": "choice accuracy", "citation_accuracy": "citation accuracy",
    "retrieval_recall": "retrieval recall@k", "style_adherence": "answer style", "completion_tokens": "answer tokens", "seconds": "seconds per answer",
}


def report_table(result: EvalResult) -> tuple[list[str], list[list[str]]]:
    """(column headers, one row per variant): mean [95% interval] per metric; tokens and seconds as means."""
    summary = _scores(result.summary)
    metrics = [m for m in METRICS if any(m in s for s in summary.values())]
    rows = []
    for name, s in summary.items():
        rows.append([name, *(f"{s[m].mean:.3f} [{s[m].low:.2f}, {s[m].high:.2f}]" if m in s and m not in ("completion_tokens", "seconds")
                              else (f"{s[m].mean:.1f}" if m in s else "-") for m in metrics)])
    return ["variant", *(LABELS[m] for m in metrics)], rows


def report_markdown(result: EvalResult) -> str:
    """The evaluation as a Markdown table (mean [95% interval] per variant and metric) and a verdict."""
    header, rows = report_table(result)
    lines = [f"# lorag eval: {result.questions} questions from {result.dataset}", "",
             "| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    lines += ["", *verdict(result.summary)]
    return "\n".join(lines) + "\n"


def verdict(summary: dict[str, VariantSummary]) -> list[str]:
    """One line per quality metric: the best variant, and whether its lead over the runner-up is
    clear (their 95% intervals do not overlap) or within noise."""
    scores = _scores(summary)
    out = []
    for m in ("f1", "contains", "choice_accuracy", "citation_accuracy", "style_adherence"):
        ranked = sorted(((s[m].mean, name, s[m]) for name, s in scores.items() if m in s), key=lambda t: -t[0])
        if len(ranked) < 2:
            continue
        (best, name, b), (second, other, o) = ranked[0], ranked[1]
        if best == second:
            out.append(f"- {LABELS[m]}: {name} and {other} tie at {best:.3f}.")
        elif b.low > o.high:
            out.append(f"- {LABELS[m]}: **{name}** wins ({best:.3f} against {other}'s {second:.3f}; the intervals do not overlap).")
        else:
            out.append(f"- {LABELS[m]}: {name} leads ({best:.3f} against {other}'s {second:.3f}), within noise on {b.n} questions: "
                       f"the 95% intervals overlap.")
    return out


def write_report(result: EvalResult, out_dir: str | Path) -> list[Path]:
    """eval.json, eval.md and eval.png (a bar chart of the quality metrics with their 95% intervals) in `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "eval.json", out / "eval.md"]
    written[0].write_text(json.dumps(result.model_dump(), indent=2))
    written[1].write_text(report_markdown(result))
    _chart(result, out / "eval.png")
    return [*written, out / "eval.png"]


def _chart(result: EvalResult, path: Path) -> None:
    """A bar per variant and quality metric at its mean, with its 95% interval as error bars."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    summary = _scores(result.summary)
    metrics = [m for m in METRICS if m not in ("completion_tokens", "seconds") and any(m in s for s in summary.values())]
    fig, ax = plt.subplots(figsize=(2 + 1.6 * len(metrics), 4))
    width = 0.8 / max(1, len(summary))
    for j, (name, s) in enumerate(summary.items()):
        xs = [i + j * width for i, m in enumerate(metrics) if m in s]
        ms = [m for m in metrics if m in s]
        means = [s[m].mean for m in ms]
        err = [[s[m].mean - s[m].low for m in ms], [s[m].high - s[m].mean for m in ms]]
        ax.bar(xs, means, width, yerr=err, capsize=3, label=name)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(metrics))], [LABELS[m] for m in metrics])
    ax.set_ylim(0, 1.05)
    ax.set_title(f"lorag eval: {result.questions} questions (95% intervals)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def store_reports(cfg, result: EvalResult, written: list[Path]) -> list[str]:
    """Copy the report files into the version directory of every adapter the evaluation compared
    (`AdapterStore.add_report`: `<store>/<name>/v<N>/eval/<timestamp>/`), so the results travel
    with the adapter, also when the store is a URI and the job's own disk is gone; returns the locations."""
    from lorag.adapters import AdapterStore

    store = AdapterStore(cfg.adapter_store)
    refs = dict.fromkeys(v.adapter for v in result.variants if v.adapter)
    return [store.add_report(name, number, written) for name, _, number in (ref.partition("@v") for ref in refs)]


def _scores(summary: dict[str, VariantSummary]) -> dict[str, dict[str, Interval]]:
    """Variant name -> the metrics it has (`VariantSummary.scores`)."""
    return {name: s.scores() for name, s in summary.items()}
