"""The commands that are not training: bench, eval / knn / linear (evaluate.py), export,
quantize (int8 / bf16 ONNX), infer and runs. Each turns a run folder, a checkpoint or a recipe
into a result, through the engine's functions; the CLI and the Python API call them."""
