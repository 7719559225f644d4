"""Data: from files to normalised batches on the training device, in three layers whose imports
only point down: ``loading`` (samplers, loaders; ``loading.build`` is the engines' entry point)
→ ``augment`` (transforms of an image or a batch) → ``sources`` (file formats, one sample at a
time). ``pack`` and ``scan`` are the ``visionzoo data`` commands. See docs/architecture.md."""
