"""How a network sees a real image outside training: the evaluation preprocessing, and ImageNet's
mean and std, which training's multi-crop normalises with too.

`build_transform`, for every model eval-imagenet scores, the features eval-transfer extracts and
train-resnet50's held-out real images: shorter side resized to `evaluate.resize` with bilinear
interpolation (torchvision's ResNet-50 reference recipe), centre crop to `evaluate.crop`,
ImageNet mean/std normalisation.
"""
from __future__ import annotations

import torch
from torchvision.transforms import v2 as T

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INTERPOLATION = "bilinear"


def build_transform(resize: int, crop: int) -> T.Compose:
    return T.Compose([
        T.ToImage(),
        T.Resize(resize, interpolation=T.InterpolationMode.BILINEAR, antialias=True),
        T.CenterCrop(crop),
        T.ToDtype(torch.float32, scale=True),
        T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])
