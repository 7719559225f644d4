"""Evaluation during and after training: top-k accuracy of a classifier (topk.py), weighted
k-NN and the linear probe on a frozen backbone (knn.py, linear_probe.py)."""
