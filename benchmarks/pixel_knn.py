"""What 20-NN on Fashion-MNIST reads without any network: the DINO k-NN protocol (L2-normalised
features, 20 neighbours voting with weight exp(cosine / 0.07), the 60,000 training images as the
bank, the 10,000 test images as queries) on the pixels themselves, on the pixels less their
training-set mean, and on their first principal components. It is the yardstick for the DINO
demo's target (docs/dino.md): a network's features pass 85% only when they keep about as much of
the garment as a linear projection of its pixels does.

    PYTHONPATH=src python benchmarks/pixel_knn.py
    PYTHONPATH=src python benchmarks/pixel_knn.py --root /usr/share/datasets/fashion-mnist --pca 32 96

Deterministic up to float round-off: no training, no sampling (the components come from an SVD
of the whole training set)."""

from __future__ import annotations

import argparse

import torch

from visionzoo.data.sources.idx import load_idx_split
from visionzoo.engine.evaluation.knn import knn_classify

FMNIST = "/usr/share/datasets/fashion-mnist"


def pixel_knn(root: str, components: list[int], k: int = 20, temperature: float = 0.07) -> dict[str, float]:
    """20-NN top-1 (%) of raw, centred and PCA-projected pixels, keyed by the feature's name."""
    train_x, train_y = load_idx_split(root, train=True)
    test_x, test_y = load_idx_split(root, train=False)
    train = torch.from_numpy(train_x).reshape(len(train_x), -1).double()
    test = torch.from_numpy(test_x).reshape(len(test_x), -1).double()
    train_labels, test_labels = torch.from_numpy(train_y), torch.from_numpy(test_y)
    mean = train.mean(0)
    _, _, vh = torch.linalg.svd(train - mean, full_matrices=False)

    features = {"pixels (784)": (train, test), "pixels less their mean (784)": (train - mean, test - mean)}
    for c in components:
        basis = vh[:c].T
        features[f"first {c} principal components"] = ((train - mean) @ basis, (test - mean) @ basis)

    result = {}
    for name, (a, b) in features.items():
        a = torch.nn.functional.normalize(a.float(), dim=1)
        b = torch.nn.functional.normalize(b.float(), dim=1)
        acc = knn_classify(a, train_labels, b, test_labels, [k], temperature, num_classes=10)
        result[name] = acc[k][0]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=FMNIST, help="folder of the IDX files")
    parser.add_argument("--pca", type=int, nargs="*", default=[32, 64, 96, 192],
                        help="numbers of principal components to try")
    args = parser.parse_args()
    print("| feature | 20-NN top-1 |\n|---|---|")
    for name, acc in pixel_knn(args.root, args.pca).items():
        print(f"| {name} | {acc:.2f} |")


if __name__ == "__main__":
    main()
