"""How batches reach the device: samplers, DataLoader set-up, shard-stream, device-resident and
device-decode loaders. ``build.py`` is the entry point the engines call (``build_datasets``,
``build_loaders``); this layer imports sources/ and augment/, never the other way."""
