"""What happens to an image or a batch: the table of augmentation presets and the paths that run
them (registry.py), the train / eval transforms of every recipe (presets.py), their per-image
(per_image.py) and batched (batched.py) crops, RandAugment per batch, mixup / cutmix, DINO's
multi-crop views, the normalisation. No file formats and no loaders."""
