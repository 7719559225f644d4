"""ResNet with the CIFAR stem, as MMClassification's ResNet_CIFAR: the 7x7 stride-2 convolution
and the max-pool of the ImageNet stem would shrink a 32 px image to 8 px before the first
stage, so the stem is one 3x3 stride-1 convolution and no pooling."""

from __future__ import annotations

import torch.nn as nn
import torchvision


def cifar_resnet(depth: int, num_classes: int, in_chans: int = 3) -> nn.Module:
    """torchvision's ResNet-{18,34,50,101,152} with the CIFAR stem."""
    builders = {
        18: torchvision.models.resnet18,
        34: torchvision.models.resnet34,
        50: torchvision.models.resnet50,
        101: torchvision.models.resnet101,
        152: torchvision.models.resnet152,
    }
    model = builders[depth](weights=None, num_classes=num_classes)
    model.conv1 = nn.Conv2d(in_chans, 64, kernel_size=3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    model.maxpool = nn.Identity()
    return model
