"""Multi-crop augmentation, the training transform of the paper (Sec. 5, "multi-crop [9]").

The recipe is DINO's (Caron et al., ICCV 2021), itself SwAV's multi-crop with
BYOL's photometric augmentations:

- 2 global crops (`global_crop_size`, area fraction in `global_crop_scale`),
- `local_crops` small crops (`local_crop_size`, area in `local_crop_scale`),
- on every crop: horizontal flip, colour jitter (p=0.8), grayscale (p=0.2);
- Gaussian blur with p=1.0 on global crop 1, p=0.1 on global crop 2, p=0.5 on
  locals; solarisation with p=0.2 on global crop 2 only. The two global crops
  are deliberately asymmetric: one is nearly always blurred, the other often sharp
  or solarised, so that together they cover both kinds of distortion.

In supervised training every crop carries the label of its image. With
`local_crops: 0` this is the plain two-crop recipe.
"""
from __future__ import annotations

import math

import torch
from PIL import Image
from torchvision import transforms as T

from .params import TrainParams

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# DINO draws the blur radius from U(0.1, 2.0) pixels, whatever the crop size.
BLUR_SIGMA = (0.1, 2.0)
# The kernel must reach 3 sigma on each side for the largest sigma to be a true Gaussian.
BLUR_KERNEL = 2 * math.ceil(3 * BLUR_SIGMA[1]) + 1


def _photometric() -> T.Compose:
    return T.Compose([
        T.RandomHorizontalFlip(p=0.5),
        T.RandomApply([T.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)], p=0.8),
        T.RandomGrayscale(p=0.2),
    ])


def _blur(p: float) -> T.RandomApply:
    return T.RandomApply([T.GaussianBlur(BLUR_KERNEL, sigma=BLUR_SIGMA)], p=p)


def normalize() -> T.Compose:
    """PIL image -> float tensor with ImageNet statistics (also what evaluation uses)."""
    return T.Compose([T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def _view(size: int, scale: tuple[float, float], *extra) -> T.Compose:
    crop = T.RandomResizedCrop(size, scale=scale, interpolation=T.InterpolationMode.BICUBIC)
    return T.Compose([crop, _photometric(), *extra, normalize()])


class MultiCrop:
    """PIL image -> [global 1, global 2, local 1, ..., local n] normalised tensors."""

    def __init__(self, global_crop_size: int, global_crop_scale: tuple[float, float],
                 local_crops: int, local_crop_size: int, local_crop_scale: tuple[float, float]):
        self.local_crops = local_crops
        self.global_1 = _view(global_crop_size, global_crop_scale, _blur(1.0))
        self.global_2 = _view(global_crop_size, global_crop_scale, _blur(0.1), T.RandomSolarize(128, p=0.2))
        self.local = _view(local_crop_size, local_crop_scale, _blur(0.5))

    @classmethod
    def from_params(cls, p: TrainParams) -> "MultiCrop":
        return cls(p.global_crop_size, p.global_crop_scale, p.local_crops, p.local_crop_size, p.local_crop_scale)

    def __call__(self, image: Image.Image) -> list[torch.Tensor]:
        crops = [self.global_1(image), self.global_2(image)]
        crops += [self.local(image) for _ in range(self.local_crops)]
        return crops
