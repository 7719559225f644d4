"""Readers that turn data sets on disk into arrays and torch Datasets."""
