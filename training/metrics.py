"""Metrics of record (numpy only), threshold choice, aggregation and the PNG plots."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def roc_curve(y: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds), thresholds decreasing; a case is positive when score >= threshold."""
    y = np.asarray(y).astype(bool)
    s = np.asarray(score, dtype=np.float64)
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    distinct = np.r_[np.flatnonzero(np.diff(s)), s.size - 1]
    tp = np.cumsum(y)[distinct]
    fp = (distinct + 1) - tp
    pos, neg = max(int(y.sum()), 1), max(int((~y).sum()), 1)
    return np.r_[0.0, fp / neg], np.r_[0.0, tp / pos], np.r_[np.inf, s[distinct]]


def roc_auc(y: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve (ties counted half); NaN with one class only."""
    y = np.asarray(y).astype(bool)
    if y.all() or not y.any():
        return float("nan")
    fpr, tpr, _ = roc_curve(y, score)
    return float(np.trapezoid(tpr, fpr))


def youden_threshold(y: np.ndarray, score: np.ndarray) -> float:
    """The threshold maximising sensitivity + specificity - 1 (midpoint to the next lower score)."""
    fpr, tpr, thr = roc_curve(y, score)
    best = int(np.argmax(tpr - fpr))
    if best == 0:
        return float(min(1.0, thr[1] + 1e-6))
    upper = thr[best]
    lower = thr[best + 1] if best + 1 < thr.size else 0.0
    return float((upper + lower) / 2)


def binary_metrics(y: np.ndarray, score: np.ndarray, threshold: float) -> dict[str, Any]:
    """accuracy, precision, recall, F1, ROC AUC, confusion matrix [[tn, fp], [fn, tp]], Brier score."""
    y = np.asarray(y).astype(int)
    s = np.asarray(score, dtype=np.float64)
    pred = (s >= threshold).astype(int)
    tp = int(((pred == 1) & (y == 1)).sum())
    tn = int(((pred == 0) & (y == 0)).sum())
    fp = int(((pred == 1) & (y == 0)).sum())
    fn = int(((pred == 0) & (y == 1)).sum())
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "n": int(y.size),
        "positives": int(y.sum()),
        "threshold": float(threshold),
        "accuracy": (tp + tn) / y.size if y.size else 0.0,
        "precision": precision,
        "recall": recall,
        "specificity": tn / (tn + fp) if tn + fp else 0.0,
        "f1": f1,
        "roc_auc": roc_auc(y, s),
        "brier": float(np.mean((s - y) ** 2)) if y.size else 0.0,
        "confusion_matrix": [[tn, fp], [fn, tp]],
    }


def aggregate(slice_scores: np.ndarray, method: str) -> float:
    """A study score from its slice scores: ``top3_mean`` (mean of the 3 highest) or ``max``."""
    s = np.sort(np.asarray(slice_scores, dtype=np.float64))[::-1]
    if s.size == 0:
        raise ValueError("no slice scores to aggregate")
    if method == "max":
        return float(s[0])
    if method == "top3_mean":
        return float(s[:3].mean())
    raise ValueError(f'Argument "method" must be "top3_mean" or "max", got {method!r}')


def study_scores(scores: np.ndarray, case_index: np.ndarray, n_cases: int, method: str) -> np.ndarray:
    """One aggregated score per case from per-slice scores."""
    return np.array([aggregate(scores[case_index == i], method) for i in range(n_cases)])


def plot_roc(curves: dict[str, tuple[np.ndarray, np.ndarray]], path: Path, title: str) -> Path:
    """ROC curves (label -> (y, score)) to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5))
    for label, (y, s) in curves.items():
        fpr, tpr, _ = roc_curve(y, s)
        ax.plot(fpr, tpr, label=f"{label} (AUC {roc_auc(y, s):.3f})")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=title, xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_confusion(matrix: list[list[int]], path: Path, title: str) -> Path:
    """A 2x2 confusion matrix ([[tn, fp], [fn, tp]]) to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = np.asarray(matrix)
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.imshow(m, cmap="Blues")
    for (i, j), v in np.ndenumerate(m):
        ax.text(j, i, str(v), ha="center", va="center", color="white" if v > m.max() / 2 else "black", fontsize=14)
    ax.set(xticks=[0, 1], yticks=[0, 1], xticklabels=["benign", "malignant"], yticklabels=["benign", "malignant"],
           xlabel="predicted", ylabel="true", title=title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
