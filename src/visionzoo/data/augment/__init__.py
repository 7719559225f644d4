"""What happens to an image or a batch: the preset train / eval transforms of every recipe
(presets.py), RandAugment per batch, mixup / cutmix, DINO's multi-crop views, and the batched
versions of the crops for in-memory and device-decoded data. No file formats and no loaders."""
