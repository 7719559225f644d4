"""visionzoo: reproducible training recipes for classic image classifiers on PyTorch."""

__version__ = "0.1.0"
