"""benchmarks/pixel_knn.py, the pixel yardstick for the DINO demo's k-NN target, on IDX files the
test writes: its numbers equal a k-NN computed here by hand, and keeping every principal component
(of 200 training images) reads exactly as the centred pixels."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from conftest import write_fmnist

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "pixel_knn.py"


def _by_hand(train: np.ndarray, train_y: np.ndarray, test: np.ndarray, test_y: np.ndarray) -> float:
    a = train / np.linalg.norm(train, axis=1, keepdims=True)
    b = test / np.linalg.norm(test, axis=1, keepdims=True)
    sim = b @ a.T
    top = np.argsort(-sim, axis=1)[:, :20]
    votes = np.zeros((len(b), 10))
    for i, row in enumerate(top):
        for j in row:
            votes[i, train_y[j]] += np.exp(sim[i, j] / 0.07)
    return float((votes.argmax(1) == test_y).mean() * 100)


def test_pixel_knn_matches_a_hand_computed_knn(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("pixel_knn", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    root = write_fmnist(tmp_path, 200, 60)
    result = bench.pixel_knn(str(root), components=[5, 200])

    from visionzoo.data.sources.idx import load_idx_split
    (tx, ty), (vx, vy) = load_idx_split(root, True), load_idx_split(root, False)
    tx, vx = tx.reshape(200, -1).astype(np.float64), vx.reshape(60, -1).astype(np.float64)
    mean = tx.mean(0)
    assert result["pixels (784)"] == pytest.approx(_by_hand(tx, ty, vx, vy))
    assert result["pixels less their mean (784)"] == pytest.approx(_by_hand(tx - mean, ty, vx - mean, vy))
    # 200 components span the 200 centred training images: every dot product with a query is kept, so
    # each query has the same neighbours in the same order (its cosines scale by one factor, the length
    # it keeps), and on these images, where one class holds nearly all the votes, the same answers.
    assert result["first 200 principal components"] == result["pixels less their mean (784)"]
    assert 0 <= result["first 5 principal components"] <= 100
    # The stripe classes are easy on their pixels: the yardstick is not a chance-level number.
    assert result["pixels less their mean (784)"] > 50
