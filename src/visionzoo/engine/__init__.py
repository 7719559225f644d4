"""Training and evaluation loops: plain functions, read top to bottom."""
