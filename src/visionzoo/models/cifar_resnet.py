"""ResNet with the CIFAR stem, as MMClassification's ResNet_CIFAR: the 7x7 stride-2 convolution
and the max-pool of the ImageNet stem would shrink a 32 px image to 8 px before the first
stage, so the stem is one 3x3 stride-1 convolution and no pooling."""

from __future__ import annotations

import torch.nn as nn
import torchvision


def cifar_resnet(depth: int, num_classes: int, in_chans: int = 3) -> nn.Module:
    """torchvision's ResNet-{18,34,50,101,152} with the CIFAR stem, initialised as mmcls v0.24.0
    initialises ResNet_CIFAR + LinearClsHead (see ``mmcls_init``)."""
    builders = {
        18: torchvision.models.resnet18,
        34: torchvision.models.resnet34,
        50: torchvision.models.resnet50,
        101: torchvision.models.resnet101,
        152: torchvision.models.resnet152,
    }
    model = builders[depth](weights=None, num_classes=num_classes)
    model.conv1 = nn.Conv2d(in_chans, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    mmcls_init(model)
    return model


def mmcls_init(model: nn.Module) -> None:
    """mmcls v0.24.0's initialisation of a ResNet classifier, in place:

    - mmcls/models/backbones/resnet.py, ``ResNet.__init__``'s init_cfg: every Conv2d Kaiming
      normal (mmcv KaimingInit defaults: fan_out, relu, bias 0), every BatchNorm weight 1, bias 0;
    - the same file, ``ResNet.init_weights``: ``zero_init_residual`` (default True) sets the last
      norm of every block (norm3 of a Bottleneck, norm2 of a BasicBlock) to 0, so that each
      residual branch starts as zero and each block as the identity;
    - mmcls/models/heads/linear_head.py, ``LinearClsHead``'s init_cfg: the classifier weight
      Normal(0, 0.01), its bias 0.

    torchvision's defaults agree on the convolutions and norms; they differ in the zeroed last
    norms and in the classifier (PyTorch's uniform Linear default)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    for m in model.modules():
        last = getattr(m, "bn3", None) if isinstance(m, torchvision.models.resnet.Bottleneck) else (
            getattr(m, "bn2", None) if isinstance(m, torchvision.models.resnet.BasicBlock) else None)
        if last is not None:
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)
    nn.init.normal_(model.fc.weight, mean=0.0, std=0.01)
    nn.init.zeros_(model.fc.bias)
