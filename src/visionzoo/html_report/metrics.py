"""Figures of a prediction set: confusion matrix, per-class accuracy, calibration (ECE), and
the images a grid should show. Pure NumPy, so they are checked against direct formulas."""

from __future__ import annotations

import numpy as np

ECE_BINS = 15  # equal-width confidence bins, as Guo et al. (2017) and most calibration papers


def confusion_matrix(targets: np.ndarray, preds: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts [true, predicted] (int64)."""
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (np.asarray(targets, dtype=np.int64), np.asarray(preds, dtype=np.int64)), 1)
    return cm


def row_normalise(cm: np.ndarray) -> np.ndarray:
    """Each row divided by its total (a class without images stays 0)."""
    rows = cm.sum(axis=1, keepdims=True)
    return np.divide(cm, rows, out=np.zeros(cm.shape, dtype=float), where=rows > 0)


def per_class_accuracy(cm: np.ndarray) -> np.ndarray:
    """Accuracy (%) of each true class; NaN for a class with no images."""
    rows = cm.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(rows > 0, 100.0 * np.diag(cm) / np.maximum(rows, 1), np.nan)


def most_confused(cm: np.ndarray, n: int = 20) -> list[tuple[int, int, int, float]]:
    """The ``n`` largest off-diagonal cells: (true, predicted, count, % of the true class)."""
    off = cm.copy()
    np.fill_diagonal(off, 0)
    flat = np.argsort(off, axis=None)[::-1][:n]
    rows = cm.sum(axis=1)
    out = []
    for f in flat:
        t, p = np.unravel_index(f, cm.shape)
        if off[t, p] == 0:
            break
        out.append((int(t), int(p), int(off[t, p]), 100.0 * off[t, p] / max(rows[t], 1)))
    return out


def calibration(confidence: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS) -> dict:
    """Reliability-diagram bins and the expected calibration error: ECE = sum over bins of
    (images in bin / N) x |accuracy in bin - mean confidence in bin|, in percent."""
    confidence = np.asarray(confidence, dtype=np.float64)
    correct = np.asarray(correct, dtype=np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    # Bin b holds (edges[b], edges[b+1]]; a confidence of exactly 0 goes into the first bin.
    which = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, bins - 1)
    count = np.bincount(which, minlength=bins)
    conf_sum = np.bincount(which, weights=confidence, minlength=bins)
    acc_sum = np.bincount(which, weights=correct, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        acc = np.where(count > 0, acc_sum / np.maximum(count, 1), np.nan)
        conf = np.where(count > 0, conf_sum / np.maximum(count, 1), np.nan)
    n = max(len(confidence), 1)
    ece = float(np.nansum(count / n * np.abs(acc - conf))) * 100.0
    return {"edges": edges, "count": count, "accuracy": acc, "confidence": conf, "ece": ece}
