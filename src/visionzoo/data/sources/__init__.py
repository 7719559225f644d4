"""What is on disk and how one sample is read: IDX and CIFAR files, ImageFolder trees (with their
cached file list), tar / parquet shards as a stream, encoded bytes for the device decoder and
in-memory tensors; ``table.py`` names the reader of every ``data.name`` and what it supports. No
DataLoader and no augmentation here; imports only point down (``visionzoo.errors``)."""
