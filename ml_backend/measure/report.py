"""Self-contained HTML bias report across model versions.

``versions`` is a list, oldest first, of ``{"version", "created_at", "parent", "metrics", "examples"}`` where
``metrics`` is :func:`ml_backend.measure.metrics.evaluate_version`'s dict and ``examples`` an optional list of
``{"image": HxW or HxWx3 uint8, "heatmap": hxw float, "finding": str, "prob": float}``. Plots are drawn with
matplotlib's object API on the Agg canvas (no pyplot global state, safe in a server thread) and embedded as
base64 PNG data URIs, so the single ``index.html`` can be mailed or archived.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from .metrics import COOCCURRENCE

__all__ = ["render_report_html", "write_report"]

GOOD, BAD, NEUTRAL, NA = "#1a7f37", "#c62828", "#6b7280", "#e5e7eb"
EOD_SCALE_MAX = 0.5  # EOD colour saturates here: a 0.5 gap in TPR/FPR between groups is already severe
BIASED_EOD = 0.2  # listed as "biased" at or above this (with its interval shown next to it)

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;margin:0;
 background:#f6f7f9;color:#1f2937;line-height:1.45}
main{max-width:1180px;margin:0 auto;padding:24px 28px 60px}
h1{font-size:1.6rem;margin:0 0 4px} h2{font-size:1.2rem;margin:36px 0 8px;border-bottom:1px solid #d1d5db;
 padding-bottom:4px} .sub{color:#6b7280;font-size:.92rem}
.headline{background:#fff;border:1px solid #d1d5db;border-radius:10px;padding:16px 18px;margin:18px 0}
.summary{font-size:1.02rem;margin:0 0 12px}
.cards{display:flex;flex-wrap:wrap;gap:12px}
.card{flex:1 1 200px;border-radius:8px;padding:10px 12px;border:1px solid #e5e7eb;border-left:6px solid #6b7280;
 background:#fafafa}
.card.improved{border-left-color:#1a7f37;background:#f0faf3}.card.worse{border-left-color:#c62828;background:#fdf2f2}
.card .name{font-size:.85rem;color:#4b5563;text-transform:uppercase;letter-spacing:.03em}
.card .value{font-size:1.55rem;font-weight:650}.card .ci{font-size:.85rem;color:#6b7280;font-weight:400}
.card .delta{font-size:.92rem;font-weight:600}.card .detail{font-size:.82rem;color:#6b7280}
.improved .delta{color:#1a7f37}.worse .delta{color:#c62828}.noise .delta,.na .delta{color:#6b7280}
.warn{background:#fff8e1;border:1px solid #f0d58c;border-radius:6px;padding:6px 10px;font-size:.9rem;margin:8px 0}
figure{margin:8px 0 4px;background:#fff;border:1px solid #e5e7eb;border-radius:8px;padding:8px}
figure img{max-width:100%;height:auto;display:block;margin:0 auto}
figcaption{font-size:.88rem;color:#4b5563;margin-top:4px}
table{border-collapse:collapse;background:#fff;font-size:.9rem;margin:6px 0}
th,td{border:1px solid #e5e7eb;padding:4px 9px;text-align:left} th{background:#f3f4f6}
td.num{text-align:right;font-variant-numeric:tabular-nums}
.bad{color:#c62828;font-weight:600}.good{color:#1a7f37}
dl.legend{display:grid;grid-template-columns:max-content 1fr;gap:4px 14px;background:#fff;border:1px solid #e5e7eb;
 border-radius:8px;padding:12px 16px;font-size:.92rem} dl.legend dt{font-weight:600} dl.legend dd{margin:0}
"""

LEGEND = [
    (
        "Macro-F1",
        "Mean over findings with positives of F1, the harmonic mean of precision and recall at the "
        "chosen threshold (1 = perfect; flagging every image scores about twice the prevalence).",
    ),
    (
        "AUROC",
        "Probability that a random positive image scores higher than a random negative one "
        "(0.5 = chance), independent of the threshold.",
    ),
    (
        "Support",
        "Number of images in the evaluation set where the finding is truly present; findings with few "
        "positives give noisy numbers.",
    ),
    (
        "EOD",
        "Equalized-odds difference: the larger of the gaps in true-positive rate and in false-positive rate "
        "between groups (0 = the model errs equally for every group, 1 = maximally unequal).",
    ),
    (
        "EOD · co-occurrence",
        "The same gap for finding A between images with and without its partner B, the finding most "
        "associated with A in the labels (phi coefficient; the pair training decorrelates): high means the "
        "model uses B as evidence for A.",
    ),
    (
        "P(B | A)",
        "Share of images with finding A (row) that also have finding B (column), in the labels and in "
        "the model's predictions; more in predictions than in labels means the model amplifies the pairing.",
    ),
    (
        "Partner dependence",
        "Mean predicted probability of A on images without A, with vs without its partner "
        "B; a positive gap means B alone raises false alarms of A.",
    ),
    (
        "Attention",
        "Share of the heatmap's mass inside the physician-drawn region, and how often its peak "
        "falls inside it (pointing game); the region's own area share is what a uniform heatmap would score.",
    ),
    (
        "Interval / noise",
        "Brackets are 95% bootstrap intervals over patients; a change is 'within noise' when "
        "the two versions' intervals overlap.",
    ),
]


# ------------------------------------------------------------------------------------------ helpers


def _f(x: Any) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _fmt(x: Any, digits: int = 2) -> str:
    v = _f(x)
    return "n/a" if v is None else f"{v:.{digits}f}"


def _fmt_ci(ci: Any, digits: int = 2) -> str:
    if not ci or len(ci) != 2 or _f(ci[0]) is None or _f(ci[1]) is None:
        return ""
    return f"[{_f(ci[0]):.{digits}f}–{_f(ci[1]):.{digits}f}]"


def _e(s: Any) -> str:
    return html.escape(str(s), quote=True)


def _png(fig: Figure) -> str:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight", facecolor="white")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _figure_html(fig: Figure, caption: str, alt: str) -> str:
    return f'<figure><img src="{_png(fig)}" alt="{_e(alt)}"><figcaption>{caption}</figcaption></figure>'


def _metrics(v: Mapping[str, Any] | None) -> dict[str, Any]:
    return dict((v or {}).get("metrics") or {})


def _labels(versions: Sequence[Mapping[str, Any]]) -> list[str]:
    """All findings, in the latest version's order, then any that only older versions had."""
    out: list[str] = []
    for v in reversed(versions):
        m = _metrics(v)
        for name in list(m.get("labels") or []) + list((m.get("per_finding") or {}).keys()):
            if name not in out:
                out.append(name)
    return out


def _attributes(versions: Sequence[Mapping[str, Any]]) -> list[str]:
    """Group attributes present in any version: sex, age, the caller's others, co-occurrence last."""
    seen: list[str] = []
    for v in versions:
        for a in _metrics(v).get("fairness") or {}:
            if a not in seen:
                seen.append(a)
    order: list[str] = [a for a in ("sex", "age") if a in seen]
    order += [a for a in seen if a not in ("sex", "age", COOCCURRENCE)]
    return order + ([COOCCURRENCE] if COOCCURRENCE in seen else [])


def _attr_title(attr: str) -> str:
    return "co-occurrence" if attr == COOCCURRENCE else attr


def _pf(m: Mapping[str, Any], name: str, key: str) -> Any:
    return ((m.get("per_finding") or {}).get(name) or {}).get(key)


def _eod(m: Mapping[str, Any], attr: str, name: str) -> tuple[float | None, Any, str | None]:
    entry = (((m.get("fairness") or {}).get(attr) or {}).get("per_finding") or {}).get(name) or {}
    return _f(entry.get("eod")), entry.get("eod_ci"), entry.get("partner")


def _worst(m: Mapping[str, Any], attr: str) -> tuple[float | None, Any, str | None]:
    fa = (m.get("fairness") or {}).get(attr) or {}
    return _f(fa.get("worst")), fa.get("worst_ci"), fa.get("worst_finding")


def _verdict(new: float | None, new_ci: Any, old: float | None, old_ci: Any, higher_better: bool) -> str:
    """'improved' / 'worse' / 'noise' (intervals overlap or equal) / 'na' (a value is missing)."""
    if new is None or old is None:
        return "na"
    if abs(new - old) < 1e-12:
        return "noise"
    cis = [c for c in (new_ci, old_ci) if c and len(c) == 2 and None not in c]
    if len(cis) == 2 and new_ci[0] <= old_ci[1] and old_ci[0] <= new_ci[1]:
        return "noise"
    return "improved" if (new > old) == higher_better else "worse"


VERDICT_TEXT = {"improved": "improved", "worse": "worse", "noise": "within noise", "na": "no comparison"}
VERDICT_COLOUR = {"improved": GOOD, "worse": BAD, "noise": NEUTRAL, "na": NEUTRAL}


# ---------------------------------------------------------------------------------------- headline


def _card(
    title: str, new: float | None, new_ci: Any, old: float | None, old_ci: Any, higher_better: bool, detail: str,
    prev_name: str | None,
) -> tuple[str, str]:  # fmt: skip
    verdict = _verdict(new, new_ci, old, old_ci, higher_better) if prev_name else "na"
    if prev_name is None:
        delta = "first version"
    elif old is None or new is None:
        delta = f"vs {_e(prev_name)}: no comparison"
    else:
        arrow = "▲" if new > old else "▼" if new < old else "="
        delta = f"{arrow} from {_fmt(old)} ({_e(prev_name)}) · {VERDICT_TEXT[verdict]}"
    card = (
        f'<div class="card {verdict}"><div class="name">{_e(title)}</div>'
        f'<div class="value">{_fmt(new)} <span class="ci">{_fmt_ci(new_ci)}</span></div>'
        f'<div class="delta">{delta}</div><div class="detail">{detail}</div></div>'
    )
    return card, verdict


def _headline(versions: Sequence[Mapping[str, Any]], attrs: list[str]) -> str:
    latest, prev = versions[-1], (versions[-2] if len(versions) > 1 else None)
    m, pm = _metrics(latest), _metrics(prev)
    prev_name = str(prev.get("version")) if prev else None
    cards, phrases = [], []
    card, verdict = _card(
        "Macro-F1 (higher is better)", _f(m.get("macro_f1")), m.get("macro_f1_ci"),
        _f(pm.get("macro_f1")), pm.get("macro_f1_ci"), True,
        f"macro-AUROC {_fmt(m.get('macro_auroc'))} · {m.get('n_images', 'n/a')} images", prev_name,
    )  # fmt: skip
    cards.append(card)
    phrases.append(("macro-F1", verdict))
    for attr in attrs:
        new, new_ci, finding = _worst(m, attr)
        old, old_ci, _ = _worst(pm, attr)
        detail = f"worst finding: {_e(finding)}" if finding else "not measurable (too few images per group)"
        if attr == COOCCURRENCE and finding:
            partner = _eod(m, attr, finding)[2]
            detail += f" (with vs without {_e(partner)})" if partner else ""
        card, verdict = _card(
            f"Worst EOD · {_attr_title(attr)} (lower is better)", new, new_ci, old, old_ci, False, detail, prev_name
        )
        cards.append(card)
        phrases.append((f"worst EOD {_attr_title(attr)}", verdict))
    if prev_name:
        parts = [
            f'<span style="color:{VERDICT_COLOUR[v]};font-weight:600">{_e(n)} {VERDICT_TEXT[v]}</span>'
            for n, v in phrases
        ]
        summary = f"Since <b>{_e(prev_name)}</b>: " + ", ".join(parts) + "."
    else:
        summary = "Only one version so far: the values below are the baseline for the next feedback round."
    created = _e(latest.get("created_at") or "")
    head = (
        f'<p class="summary">Latest version <b>{_e(latest.get("version"))}</b> ({created}). {summary}</p>'
        f'<div class="cards">{"".join(cards)}</div>'
    )
    biased = _biased_list(m, attrs)
    if prev is not None:
        biased = _changes_list(pm, m, _labels(versions), attrs, prev_name or "") + biased
    warn = ""
    if m.get("thresholds_source") == "tuned_on_eval":
        warn = (
            '<div class="warn">Thresholds were tuned on the evaluation data itself: F1 values are optimistic '
            "(comparisons between versions remain fair).</div>"
        )
    return f'<section class="headline">{head}{biased}{warn}</section>'


def _changes_list(pm: Mapping[str, Any], m: Mapping[str, Any], labels: list[str], attrs: list[str], prev: str) -> str:
    """Per-finding changes whose bootstrap intervals do not overlap (the ones worth a clinician's attention)."""
    rows = []
    for name in labels:
        cands = [("F1", _pf(pm, name, "f1"), _pf(pm, name, "f1_ci"), _pf(m, name, "f1"), _pf(m, name, "f1_ci"), True)]
        for attr in attrs:
            by = "EOD with vs without partner" if attr == COOCCURRENCE else f"EOD by {attr}"
            cands.append((by, *_eod(pm, attr, name)[:2], *_eod(m, attr, name)[:2], False))
        for what, old, old_ci, new, new_ci, higher_better in cands:
            if not (old_ci and new_ci):  # a change is only claimed with intervals on both sides
                continue
            new_f, old_f = _f(new), _f(old)
            if new_f is None or old_f is None:
                continue
            verdict = _verdict(new_f, new_ci, old_f, old_ci, higher_better)
            if verdict in ("improved", "worse"):
                rows.append((abs(new_f - old_f), name, what, old_f, new_f, verdict))
    if not rows:
        return f'<p class="sub">No per-finding change since {_e(prev)} is outside the bootstrap noise.</p>'
    rows.sort(key=lambda r: -r[0])
    items = [
        f"<li><b>{_e(name)}</b> {_e(what)}: {old:.2f} → {new:.2f} "
        f'<span style="color:{VERDICT_COLOUR[v]};font-weight:600">{VERDICT_TEXT[v]}</span></li>'
        for _, name, what, old, new, v in rows[:8]
    ]
    more = f" (and {len(rows) - 8} more)" if len(rows) > 8 else ""
    return (
        f'<p style="margin:12px 0 2px"><b>Changes outside noise since {_e(prev)}</b>{more}:</p>'
        f'<ul style="margin:2px 0">{"".join(items)}</ul>'
    )


def _biased_list(m: Mapping[str, Any], attrs: list[str]) -> str:
    rows = []
    for attr in attrs:
        for name in _labels([{"metrics": m}]):
            eod, ci, partner = _eod(m, attr, name)
            if eod is not None and eod >= BIASED_EOD:
                rows.append((eod, name, attr, ci, partner))
    if not rows:
        return f'<p class="sub">No finding has an EOD of {BIASED_EOD} or more in the latest version.</p>'
    # Confidently biased first: by the interval's lower end where there is one.
    rows.sort(key=lambda r: -(_f(r[3][0]) or 0.0 if r[3] and _f(r[3][0]) is not None else 0.5 * r[0]))
    items = []
    for eod, name, attr, ci, partner in rows[:8]:
        by = f"with vs without {_e(partner)}" if attr == COOCCURRENCE else f"by {_e(attr)}"
        lo, hi = (_f(ci[0]), _f(ci[1])) if ci else (None, None)
        wide = lo is not None and hi is not None and hi - lo > 0.5
        note = ' <span class="sub">(wide interval: few images)</span>' if wide else ""
        items.append(f'<li><b>{_e(name)}</b> {by}: <span class="bad">EOD {eod:.2f}</span> {_fmt_ci(ci)}{note}</li>')
    more = f" (and {len(rows) - 8} more)" if len(rows) > 8 else ""
    return (
        f'<p style="margin:12px 0 2px"><b>Most biased findings</b> (EOD ≥ {BIASED_EOD}, most certain first){more}:</p>'
        f'<ul style="margin:2px 0">{"".join(items)}</ul>'
    )


# ------------------------------------------------------------------------------------------- plots


def _f1_plot(m: Mapping[str, Any], labels: list[str], version: str) -> str:
    k = len(labels)
    fig = Figure(figsize=(9.5, 0.42 * k + 1.5))
    ax = fig.add_subplot()
    y = np.arange(k)
    f1 = np.array([np.nan if _f(_pf(m, n, "f1")) is None else _f(_pf(m, n, "f1")) for n in labels])
    auc = np.array([np.nan if _f(_pf(m, n, "auroc")) is None else _f(_pf(m, n, "auroc")) for n in labels])
    ax.barh(y, np.nan_to_num(f1), color="#4c78a8", height=0.62, label="F1 (line: 95% interval)")
    col = ax.get_yaxis_transform()  # x in axes units, y in data units: a text column right of the plot
    ax.text(1.02, -0.9, "F1 [95% interval]", transform=col, fontsize=8.5, fontweight="bold", va="center")
    ticks = []
    for i, name in enumerate(labels):
        support = _pf(m, name, "support")
        ticks.append(f"{name}  (n={support if support is not None else '?'})")
        ci = _pf(m, name, "f1_ci")
        has_ci = bool(ci) and _f(ci[0]) is not None and _f(ci[1]) is not None
        if has_ci:
            ax.plot([ci[0], ci[1]], [i, i], color="#1f2937", lw=1.3)
            ax.plot([ci[0], ci[0]], [i - 0.15, i + 0.15], [ci[1], ci[1]], [i - 0.15, i + 0.15], color="#1f2937", lw=1.3)
        if np.isnan(f1[i]):
            ax.text(0.01, i, "no positives in the evaluation set: F1 undefined", va="center", fontsize=8.5,
                    color=NEUTRAL, style="italic")  # fmt: skip
            ax.text(1.02, i, "n/a", transform=col, va="center", fontsize=8.5, color=NEUTRAL)
        else:
            ax.text(1.02, i, f"{f1[i]:.2f} {_fmt_ci(ci) if has_ci else ''}", transform=col, va="center", fontsize=8.5)
    ok = ~np.isnan(auc)
    ax.scatter(auc[ok], y[ok], marker="D", s=30, facecolor="white", edgecolor="#e45756", lw=1.5, zorder=3,
               label="AUROC")  # fmt: skip
    ax.set_yticks(y, ticks)
    ax.set_ylim(k - 0.5, -1.3)
    ax.set_xlim(0, 1.0)
    ax.set_xlabel("score (0–1)")
    ax.axvline(0.5, color="#d1d5db", lw=0.8, ls=":", zorder=0)
    ax.set_title(f"Per-finding F1 and AUROC — {version}", fontsize=11)
    ax.legend(loc="lower right", fontsize=8.5, framealpha=0.95)
    ax.spines[["top", "right"]].set_visible(False)
    return _figure_html(fig, "Bars: F1 at the version's thresholds with its bootstrap interval; diamonds: AUROC; "
                        "n = images where the finding is present. Few positives mean wide intervals.",
                        "per-finding F1")  # fmt: skip


def _eod_matrix(m: Mapping[str, Any], labels: list[str], attrs: list[str]) -> np.ndarray:
    vals = np.full((len(labels), len(attrs)), np.nan)
    for i, name in enumerate(labels):
        for j, attr in enumerate(attrs):
            eod = _eod(m, attr, name)[0]
            vals[i, j] = np.nan if eod is None else eod
    return vals


def _eod_plot(m: Mapping[str, Any], labels: list[str], attrs: list[str], version: str) -> str:
    vals = _eod_matrix(m, labels, attrs)
    fig = Figure(figsize=(2.1 * len(attrs) + 3.2, 0.42 * len(labels) + 1.6))
    ax = fig.add_subplot()
    cmap = _cmap("Reds")
    im = ax.imshow(np.ma.masked_invalid(vals), cmap=cmap, vmin=0, vmax=EOD_SCALE_MAX, aspect="auto")
    for i, name in enumerate(labels):
        for j, attr in enumerate(attrs):
            v = vals[i, j]
            if np.isnan(v):
                ax.text(j, i, "n/a", ha="center", va="center", fontsize=8, color=NEUTRAL)
                continue
            text = f"{v:.2f}"
            partner = _eod(m, attr, name)[2]
            if attr == COOCCURRENCE and partner:
                text += f"  vs {partner}"
            colour = "white" if v > 0.6 * EOD_SCALE_MAX else "#111827"
            ax.text(j, i, text, ha="center", va="center", fontsize=8.5, color=colour,
                    fontweight="bold" if v >= BIASED_EOD else "normal")  # fmt: skip
    ax.set_xticks(range(len(attrs)), [_attr_title(a) for a in attrs])
    ax.xaxis.tick_top()
    ax.set_yticks(range(len(labels)), labels)
    ax.tick_params(length=0)
    ax.set_title(f"Equalized-odds difference per finding and group — {version}", fontsize=11, pad=24)
    cb = fig.colorbar(im, ax=ax, fraction=0.04, pad=0.02, extend="max")
    cb.set_label(f"EOD (red = biased; saturates at {EOD_SCALE_MAX})")
    return _figure_html(fig, "Each cell: the larger of the TPR gap and the FPR gap between the groups of that "
                        "attribute (bold ≥ 0.2). Grey n/a: too few positives or negatives in a group to compare. "
                        "Co-occurrence compares images with and without the named partner finding.",
                        "equalized odds heatmap")  # fmt: skip


def _cmap(name: str) -> Any:
    """A named colormap with grey for masked (undefined) cells."""
    return colormaps[name].with_extremes(bad=NA)


def _matrix(rows: Any, k: int) -> np.ndarray:
    out = np.full((k, k), np.nan)
    for i, row in enumerate((rows or [])[:k]):
        for j, v in enumerate((row or [])[:k]):
            fv = _f(v)
            out[i, j] = np.nan if fv is None else fv
    return out


def _cooc_plot(m: Mapping[str, Any], version: str) -> str | None:
    co = m.get("cooccurrence") or {}
    labels = list(co.get("labels") or [])
    k = len(labels)
    if k < 2:
        return None
    lab = _matrix(co.get("label_cooccurrence"), k)
    pred = _matrix(co.get("prediction_cooccurrence"), k)
    np.fill_diagonal(lab, np.nan)  # P(A | A) = 1 says nothing
    np.fill_diagonal(pred, np.nan)
    diff = pred - lab
    fig = Figure(figsize=(17, 6.2), layout="constrained")  # three square panels plus tick labels
    axes = fig.subplots(1, 3)
    blues = _cmap("Blues")
    rdbu = _cmap("RdBu_r")
    panels: list[tuple[Any, str, Any, dict[str, Any]]] = [
        (lab, "labels: P(column | row)", blues, {"vmin": 0, "vmax": 1}),
        (pred, "predictions: P(column | row)", blues, {"vmin": 0, "vmax": 1}),
        (diff, "predictions − labels (red = amplified)", rdbu, {"norm": TwoSlopeNorm(0, -0.5, 0.5)}),
    ]
    for ax, (mat, title, cmap, kw) in zip(axes, panels, strict=True):
        im = ax.imshow(np.ma.masked_invalid(mat), cmap=cmap, aspect="equal", **kw)
        if k <= 16:
            for i in range(k):
                for j in range(k):
                    if not np.isnan(mat[i, j]) and abs(mat[i, j]) >= 0.005:
                        strong = abs(mat[i, j]) > 0.6 if cmap is blues else abs(mat[i, j]) > 0.3
                        ax.text(j, i, f"{100 * mat[i, j]:.0f}", ha="center", va="center", fontsize=6.5,
                                color="white" if strong else "#111827")  # fmt: skip
        ax.set_xticks(range(k), labels, rotation=60, ha="right", fontsize=8)
        ax.set_yticks(range(k), labels if ax is axes[0] else [""] * k, fontsize=8)
        ax.tick_params(length=0)
        ax.set_title(title, fontsize=10.5)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02, shrink=0.8)
    fig.suptitle(f"Co-occurrence of findings — {version} (cells in %)", fontsize=11.5)
    return _figure_html(fig, "Row A, column B: share of images with A that also have B. Left the physicians' "
                        "labels, middle the model's positive predictions, right their difference: red cells are "
                        "pairs the model predicts together more often than they occur.",
                        "co-occurrence matrices")  # fmt: skip


def _dumbbell_plot(prev: Mapping[str, Any], new: Mapping[str, Any], labels: list[str], attrs: list[str]) -> str:
    pm, m = _metrics(prev), _metrics(new)
    panels: list[tuple[str, bool, list[tuple[Any, Any, Any, Any]]]] = [
        ("F1 (higher is better)", True,
         [(_pf(pm, n, "f1"), _pf(pm, n, "f1_ci"), _pf(m, n, "f1"), _pf(m, n, "f1_ci")) for n in labels]),
    ]  # fmt: skip
    for attr in attrs:
        rows = [(*_eod(pm, attr, n)[:2], *_eod(m, attr, n)[:2]) for n in labels]
        panels.append((f"EOD · {_attr_title(attr)} (lower is better)", False, rows))
    k = len(labels)
    fig = Figure(figsize=(3.3 * len(panels) + 1.6, 0.4 * k + 1.9), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(panels), sharey=True))
    y = np.arange(k)
    for ax, (title, higher_better, rows) in zip(axes, panels, strict=True):
        for i, (old, old_ci, val, val_ci) in enumerate(rows):
            old, val = _f(old), _f(val)
            verdict = _verdict(val, val_ci, old, old_ci, higher_better)
            colour = VERDICT_COLOUR[verdict]
            if old is not None and val is not None:
                ax.annotate("", xy=(val, i), xytext=(old, i),
                            arrowprops={"arrowstyle": "-|>", "color": colour, "lw": 1.6,
                                        "shrinkA": 3, "shrinkB": 3})  # fmt: skip
            if old is not None:
                ax.scatter([old], [i], s=30, facecolor="white", edgecolor="#9ca3af", lw=1.3, zorder=3)
            if val is not None:
                ax.scatter([val], [i], s=38, color=colour, zorder=4)
            if old is None and val is None:
                ax.text(0.5, i, "n/a", ha="center", va="center", fontsize=8, color=NEUTRAL)
        ax.set_title(title, fontsize=10)
        ax.set_xlim(-0.03, 1.03)
        ax.grid(axis="x", color="#eef0f3")
        ax.spines[["top", "right"]].set_visible(False)
    axes[0].set_yticks(y, labels)
    axes[0].invert_yaxis()
    handles = [
        _legend_dot("white", "#9ca3af", f"previous ({prev.get('version')})"),
        _legend_dot(GOOD, GOOD, "latest: improved"),
        _legend_dot(BAD, BAD, "latest: worse"),
        _legend_dot(NEUTRAL, NEUTRAL, "latest: within noise / n.a."),
    ]
    fig.legend(handles=handles, loc="outside lower center", ncol=4, fontsize=8.5, frameon=False)
    fig.suptitle(f"Before → after per finding: {prev.get('version')} → {new.get('version')}", fontsize=11.5)
    return _figure_html(fig, "Hollow dot: previous version; filled dot and arrow: latest. Green/red only when "
                        "the two bootstrap intervals do not overlap; grey changes are within noise.",
                        "before and after per finding")  # fmt: skip


def _legend_dot(face: str, edge: str, label: str) -> Any:

    return Line2D([], [], marker="o", ls="", markerfacecolor=face, markeredgecolor=edge, markersize=7, label=label)


def _trend_plot(versions: Sequence[Mapping[str, Any]], attrs: list[str]) -> str:
    names = [str(v.get("version")) for v in versions]
    x = np.arange(len(versions))
    fig = Figure(figsize=(13, 4.2), layout="constrained")
    ax1, ax2 = fig.subplots(1, 2)

    def series(getter: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        val, lo, hi = [], [], []
        for v in versions:
            point, ci = getter(_metrics(v))
            val.append(np.nan if _f(point) is None else _f(point))
            ok = ci and len(ci) == 2 and _f(ci[0]) is not None and _f(ci[1]) is not None
            lo.append(_f(ci[0]) if ok else np.nan)
            hi.append(_f(ci[1]) if ok else np.nan)
        return np.array(val), np.array(lo), np.array(hi)

    val, lo, hi = series(lambda m: (m.get("macro_f1"), m.get("macro_f1_ci")))
    ax1.plot(x, val, "o-", color="#4c78a8", label="macro-F1")
    ax1.fill_between(x, lo, hi, color="#4c78a8", alpha=0.18, lw=0, label="95% interval")
    val, _, _ = series(lambda m: (m.get("macro_auroc"), None))
    ax1.plot(x, val, "s--", color="#e45756", ms=5, label="macro-AUROC")
    ax1.set_title("Quality across versions (higher is better)", fontsize=10.5)
    colours = ["#b279a2", "#f58518", "#54a24b", "#72b7b2", "#9d755d", "#bab0ac"]
    for i, attr in enumerate(attrs):
        c = colours[i % len(colours)]
        val, lo, hi = series(lambda m, a=attr: _worst(m, a)[:2])
        ax2.plot(x, val, "o-", color=c, label=f"worst · {_attr_title(attr)}")
        ax2.fill_between(x, lo, hi, color=c, alpha=0.09, lw=0)
        mean, _, _ = series(lambda m, a=attr: (((m.get("fairness") or {}).get(a) or {}).get("mean"), None))
        ax2.plot(x, mean, "--", color=c, lw=1.2, alpha=0.9, label=f"mean · {_attr_title(attr)}")
    ax2.set_title("EOD across versions: worst finding (solid) and mean (dashed); lower is better", fontsize=10.5)
    for ax in (ax1, ax2):
        ax.set_xticks(x, names, rotation=30 if len(names) > 5 else 0, ha="right" if len(names) > 5 else "center")
        ax.set_ylim(0, 1.02)
        ax.set_xlim(-0.3, max(len(x) - 0.7, 0.3))
        ax.grid(color="#eef0f3")
        ax.spines[["top", "right"]].set_visible(False)
        if ax.get_legend_handles_labels()[0]:  # a version without fairness figures has no EOD line to name
            ax.legend(fontsize=8.5, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    return _figure_html(fig, "Shaded bands: 95% bootstrap intervals. Each point is one model version, oldest "
                        "left; the right panel shows, per group attribute, the finding with the largest EOD.",
                        "trends across versions")  # fmt: skip


def _examples_plot(examples: Sequence[Mapping[str, Any]], version: str) -> str | None:
    examples = [e for e in examples if e.get("image") is not None][:12]
    if not examples:
        return None
    cols = min(6, len(examples))
    rows = math.ceil(len(examples) / cols)
    fig = Figure(figsize=(2.5 * cols, 2.75 * rows))
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    for ax in axes:
        ax.axis("off")
    for ax, ex in zip(axes, examples, strict=False):
        img = np.asarray(ex["image"])
        h, w = img.shape[:2]
        ax.imshow(img, cmap="gray" if img.ndim == 2 else None, extent=(0, w, h, 0))
        heat = ex.get("heatmap")
        if heat is not None:
            heat = np.clip(np.nan_to_num(np.asarray(heat, dtype=float)), 0, None)
            if heat.max() > 0:
                heat = heat / heat.max()
            rgba = _cmap("jet")(heat)
            rgba[..., 3] = 0.75 * np.sqrt(heat)  # transparent where the model did not look
            ax.imshow(rgba, extent=(0, w, h, 0), interpolation="bilinear")
        prob = _f(ex.get("prob"))
        ax.set_title(f"{ex.get('finding', '?')}  p={'n/a' if prob is None else f'{prob:.2f}'}", fontsize=9.5)
    fig.suptitle(f"Example heatmaps — {version}", fontsize=11)
    return _figure_html(fig, "Where the model looked for the named finding (red = strongest evidence); p is the "
                        "predicted probability.", "example heatmaps")  # fmt: skip


# ------------------------------------------------------------------------------------------ tables


def _dependence_table(m: Mapping[str, Any]) -> str:
    dep = (m.get("cooccurrence") or {}).get("partner_dependence") or {}
    if not dep:
        return ""
    rows = []
    for name, d in dep.items():
        absent, present = d.get("a_absent") or {}, d.get("a_present") or {}
        gap = _f(absent.get("gap"))
        cls = "bad" if gap is not None and gap >= 0.1 else ""
        rows.append(
            f"<tr><td>{_e(name)}</td><td>{_e(d.get('partner'))}</td>"
            f'<td class="num">{_fmt(absent.get("b_present"))} (n={absent.get("n_b_present", "?")})</td>'
            f'<td class="num">{_fmt(absent.get("b_absent"))} (n={absent.get("n_b_absent", "?")})</td>'
            f'<td class="num {cls}">{_fmt(gap)}</td><td class="num">{_fmt(present.get("gap"))}</td></tr>'
        )
    return (
        "<h3>Does the prediction of A follow its partner B?</h3>"
        "<table><tr><th>finding A</th><th>partner B</th><th>mean P(A), A absent, B present</th>"
        "<th>… A absent, B absent</th><th>gap (false-alarm push)</th><th>gap when A present</th></tr>"
        + "".join(rows)
        + "</table>"
    )


def _attention_table(m: Mapping[str, Any]) -> str:
    att = m.get("attention") or {}
    if not att:
        return ""
    rows = []
    for name, a in att.items():
        a = a or {}
        mass, area = _f(a.get("mass_inside")), _f(a.get("region_fraction"))
        cls = "good" if mass is not None and area is not None and mass > area else "bad" if mass is not None else ""
        rows.append(
            f"<tr><td>{_e(name)}</td><td class='num'>{a.get('n', 0)}</td>"
            f"<td class='num {cls}'>{_fmt(mass)}</td><td class='num'>{_fmt(area)}</td>"
            f"<td class='num'>{_fmt(a.get('pointing_hit_rate'))}</td></tr>"
        )
    return (
        "<h2>Attention on annotated regions</h2><table><tr><th>finding</th><th>images</th>"
        "<th>heatmap mass inside region</th><th>region area share (chance)</th><th>pointing-game hit rate</th>"
        "</tr>" + "".join(rows) + "</table>"
    )


def _history_table(versions: Sequence[Mapping[str, Any]], attrs: list[str]) -> str:
    head = "".join(f"<th>worst EOD {_e(_attr_title(a))}</th>" for a in attrs)
    rows = []
    for v in reversed(versions):
        m = _metrics(v)
        cells = "".join(f"<td class='num'>{_fmt(_worst(m, a)[0])} {_fmt_ci(_worst(m, a)[1])}</td>" for a in attrs)
        rows.append(
            f"<tr><td><b>{_e(v.get('version'))}</b></td><td>{_e(v.get('created_at') or '')}</td>"
            f"<td>{_e(v.get('parent') or '—')}</td><td class='num'>{m.get('n_images', 'n/a')}</td>"
            f"<td class='num'>{_fmt(m.get('macro_f1'))} {_fmt_ci(m.get('macro_f1_ci'))}</td>{cells}</tr>"
        )
    return (
        "<h2>Version history</h2><table><tr><th>version</th><th>created</th><th>parent</th><th>images</th>"
        f"<th>macro-F1</th>{head}</tr>" + "".join(rows) + "</table>"
    )


def _data_notes(m: Mapping[str, Any]) -> str:
    """What the version could not use or measure, in plain words: skipped regions and unmeasured groups."""
    notes = []
    skipped = m.get("regions_skipped") or {}
    if skipped.get("count"):
        reasons = "; ".join(f"{_e(r)} ({n})" for r, n in list((skipped.get("reasons") or {}).items())[:8])
        notes.append(f"{int(skipped['count'])} region(s) or field(s) skipped: {reasons}")
    for attr, cov in (m.get("fairness_coverage") or {}).items():
        if not cov.get("measured"):
            notes.append(f"Equalized Odds by {_e(attr)} not measured: {_e(cov.get('reason'))}")
    if not notes:
        return ""
    return "<h2>Data notes</h2>" + "".join(f"<p class='warn'>{n}</p>" for n in notes)


# ------------------------------------------------------------------------------------------- public


def render_report_html(versions: Sequence[Mapping[str, Any]]) -> str:
    """The whole report as one HTML string (CSS inline, plots as base64 PNG data URIs)."""
    title = "MEDebiaser — bias report"
    if not versions:
        body = "<p>No model versions have been measured yet.</p>"
        return (
            f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title></head><body>{body}</body></html>"
        )
    versions = list(versions)
    latest = versions[-1]
    m = _metrics(latest)
    labels, attrs = _labels(versions), _attributes(versions)
    name = str(latest.get("version"))
    parts = [
        f"<h1>{title}</h1>",
        f'<p class="sub">{len(versions)} version(s), latest <b>{_e(name)}</b>. Findings: {_e(", ".join(labels))}.</p>',
        _headline(versions, attrs),
        _data_notes(m),
    ]
    if labels:
        parts += ["<h2>Per-finding quality</h2>", _f1_plot(m, labels, name)]
    if labels and attrs:
        parts += ["<h2>Bias: Equalized Odds by group</h2>", _eod_plot(m, labels, attrs, name)]
    cooc = _cooc_plot(m, name)
    if cooc:
        parts += ["<h2>Co-occurrence: labels vs predictions</h2>", cooc, _dependence_table(m)]
    if len(versions) > 1 and labels:
        parts += ["<h2>What the last feedback round changed</h2>", _dumbbell_plot(versions[-2], latest, labels, attrs)]
    parts += ["<h2>Trends across versions</h2>", _trend_plot(versions, attrs)]
    parts.append(_attention_table(m))
    examples = _examples_plot(latest.get("examples") or [], name)
    if examples:
        parts += ["<h2>Example heatmaps</h2>", examples]
    parts.append(_history_table(versions, attrs))
    legend = "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in LEGEND)
    parts.append(f'<h2>How to read this report</h2><dl class="legend">{legend}</dl>')
    return (
        f"<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        f"<meta name='viewport' content='width=device-width, initial-scale=1'><title>{title} — {_e(name)}</title>"
        f"<style>{CSS}</style></head><body><main>{''.join(parts)}</main></body></html>"
    )


def write_report(versions: Sequence[Mapping[str, Any]], out_dir: Path | str) -> Path:
    """Write ``out_dir/index.html`` (creating ``out_dir``) and return its path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "index.html"
    path.write_text(render_report_html(versions), encoding="utf-8")
    return path
