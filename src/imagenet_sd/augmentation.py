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

How it is computed. The recipe was first written as torchvision transforms on PIL
images; the loader spent most of its time there (see docs/benchmarks.md, "data
loader images/s per core"). The same recipe now runs on tensors:

- the image becomes a uint8 tensor once (a channels-last view of its pixels), and
  every crop is cut and resized from it with torch's bicubic antialiased uint8
  kernel (vectorised; within one 8-bit level of PIL's bicubic resize);
- the rest is float32 in [0, 1] at crop size: torchvision's tensor brightness,
  contrast, saturation and grayscale, and two of our own, which compute the same
  as torchvision's in fewer passes: `adjust_hue` and `gaussian_blur` (the 13-tap
  Gaussian, as two 1-D passes instead of one 13x13 convolution);
- the random draws are torchvision's, in torchvision's order, from the torch
  generator: a seed gives the same crops, flips, jitter factors, blur radii and
  solarisations as the PIL transforms did.

The images differ from the PIL version's by rounding only (PIL rounds to 8 bits
after every step and quantises hue to 256 levels; here nothing is rounded after
the resize).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as nnf
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms.v2 import functional as F

from .params import TrainParams

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# DINO draws the blur radius from U(0.1, 2.0) pixels, whatever the crop size.
BLUR_SIGMA = (0.1, 2.0)
# The kernel must reach 3 sigma on each side for the largest sigma to be a true Gaussian.
BLUR_KERNEL = 2 * math.ceil(3 * BLUR_SIGMA[1]) + 1

CROP_RATIO = (3 / 4, 4 / 3)          # RandomResizedCrop's default aspect ratios
FLIP_P = 0.5
JITTER = T.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)   # its ranges, its draws
JITTER_P = 0.8
GRAYSCALE_P = 0.2
SOLARIZE_P = 0.2                     # global crop 2 only
SOLARIZE_THRESHOLD = 128 / 255       # PIL's solarize(image, 128) on 8-bit pixels

_MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
_STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)
# Hue -> RGB: channel = V - C * clamp(min(k, 4 - k), 0, 1), k = (n + 6 hue) mod 6, n = 5, 3, 1 for R, G, B.
_HUE_OFFSETS = torch.tensor((5.0, 3.0, 1.0)).view(3, 1, 1)


def normalize() -> T.Compose:
    """PIL image -> float tensor with ImageNet statistics (also what evaluation uses)."""
    return T.Compose([T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def pixels(image: Image.Image | torch.Tensor) -> torch.Tensor:
    """An RGB image as a uint8 (3, H, W) tensor: a PIL image (any mode), or such a tensor as it is
    (e.g. from torchvision.io.decode_jpeg(..., mode=ImageReadMode.RGB))."""
    if isinstance(image, Image.Image):
        rgb = image if image.mode == "RGB" else image.convert("RGB")
        # A channels-last view: the uint8 bicubic resize reads it without a copy.
        return torch.from_numpy(np.array(rgb)).permute(2, 0, 1)
    if not (isinstance(image, torch.Tensor) and image.dtype == torch.uint8 and image.ndim == 3
            and image.shape[0] == 3):
        what = f"{image.dtype} tensor of shape {tuple(image.shape)}" if isinstance(image, torch.Tensor) else type(image)
        raise TypeError(f"MultiCrop takes a PIL image or a uint8 (3, H, W) tensor, not a {what}")
    return image


def adjust_hue(image: torch.Tensor, hue_factor: float) -> torch.Tensor:
    """torchvision's adjust_hue of a float RGB (3, H, W) image in [0, 1], in a fifth of the time.

    HSV keeps the largest channel V and the spread C = max - min; turning the hue only
    moves which channel sits where between them, so the image is rebuilt from V, C and
    the turned hue without forming S or going back through HSV's six sectors. Sectors
    are picked with lerp by a 0/1 mask (exact at 0 and 1), which is several times
    faster than torch.where on the CPU.
    """
    r, g, b = image.unbind(0)
    value = torch.maximum(torch.maximum(r, g), b)
    chroma = value - torch.minimum(torch.minimum(r, g), b)
    scale = chroma.clamp(min=1e-12).reciprocal_()       # grey pixels (C = 0) stay grey, whatever their hue
    # Hue in sixths of a turn, in [-1, 5): torchvision's formula for the sector of the largest
    # channel, R before G before B when two are equal (where both formulas agree anyway).
    hue = torch.lerp((r - g).mul_(scale).add_(4), (b - r).mul_(scale).add_(2), (value == g).float())
    hue = torch.lerp(hue, (g - b).mul_(scale), (value == r).float())
    k = (hue + 6 * hue_factor).unsqueeze(0) + _HUE_OFFSETS
    k.sub_(k.div(6).floor_().mul_(6))                   # mod 6; remainder_ is 3x slower
    k = torch.minimum(k, 4 - k).clamp_(0, 1)
    return torch.addcmul(value, chroma, k, value=-1)


def _gaussian_kernel(sigma: float, size: int) -> list[float]:
    """torchvision's 1-D Gaussian kernel (exp(-d^2 / 2 sigma^2), normalised), centre first then by distance."""
    weights = [math.exp(-0.5 * (d / sigma) ** 2) for d in range(size // 2 + 1)]
    total = weights[0] + 2 * sum(weights[1:])
    return [w / total for w in weights]


def gaussian_blur(image: torch.Tensor, sigma: float, kernel_size: int = BLUR_KERNEL) -> torch.Tensor:
    """torchvision's gaussian_blur(image, [k, k], [sigma, sigma]) of a float (C, H, W) image.

    The same kernel and reflect padding, applied as a horizontal then a vertical pass of
    shifted, weighted sums (2k multiply-adds a pixel instead of k^2). Taps whose weight
    is below 1e-7 (the far ones of a small sigma) are skipped: a change of at most
    1.2e-6, against 1/255 for one 8-bit level.
    """
    weights = _gaussian_kernel(sigma, kernel_size)
    reach = max(d for d, w in enumerate(weights) if d == 0 or w >= 1e-7)
    pad = kernel_size // 2
    height, width = image.shape[-2:]
    padded = nnf.pad(image.unsqueeze(0), [pad] * 4, mode="reflect")[0]
    rows = padded[:, :, pad:pad + width] * weights[0]
    for d in range(1, reach + 1):
        rows.add_(padded[:, :, pad - d:pad - d + width], alpha=weights[d])
        rows.add_(padded[:, :, pad + d:pad + d + width], alpha=weights[d])
    out = rows[:, pad:pad + height] * weights[0]
    for d in range(1, reach + 1):
        out.add_(rows[:, pad - d:pad - d + height], alpha=weights[d])
        out.add_(rows[:, pad + d:pad + d + height], alpha=weights[d])
    return out


def _colour_jitter(image: torch.Tensor) -> torch.Tensor:
    """ColorJitter(0.4, 0.4, 0.2, 0.1): its draws (order, then factors), applied to a float image."""
    order, brightness, contrast, saturation, hue = T.ColorJitter.get_params(
        JITTER.brightness, JITTER.contrast, JITTER.saturation, JITTER.hue)
    for op in order.tolist():
        if op == 0:
            image = F.adjust_brightness_image(image, brightness)
        elif op == 1:
            image = F.adjust_contrast_image(image, contrast)
        elif op == 2:
            image = F.adjust_saturation_image(image, saturation)
        else:
            image = adjust_hue(image, hue)
    return image


class _View:
    """One kind of crop: RandomResizedCrop (bicubic) -> flip -> jitter -> grayscale -> blur
    [-> solarize] -> normalise, with torchvision's random draws in torchvision's order."""

    def __init__(self, size: int, scale: tuple[float, float], blur_p: float, solarize_p: float | None = None):
        self.size, self.scale = size, tuple(scale)
        self.blur_p, self.solarize_p = blur_p, solarize_p

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        top, left, height, width = T.RandomResizedCrop.get_params(image, list(self.scale), list(CROP_RATIO))
        crop = F.resized_crop_image(image, top, left, height, width, [self.size, self.size],
                                    interpolation=T.InterpolationMode.BICUBIC, antialias=True)
        if torch.rand(1) < FLIP_P:
            crop = crop.flip(-1)
        x = crop.float().div_(255)
        if not JITTER_P < torch.rand(1):                    # RandomApply's test
            x = _colour_jitter(x)
        if torch.rand(1) < GRAYSCALE_P:
            x = F.rgb_to_grayscale_image(x, num_output_channels=3)
        if not self.blur_p < torch.rand(1):
            x = gaussian_blur(x, torch.empty(1).uniform_(*BLUR_SIGMA).item())
        if self.solarize_p is not None and torch.rand(1).item() < self.solarize_p:
            x = torch.where(x >= SOLARIZE_THRESHOLD, 1 - x, x)
        return x.sub(_MEAN).div_(_STD)


class MultiCrop:
    """Image -> [global 1, global 2, local 1, ..., local n] normalised float32 tensors.

    The image is a PIL image or a uint8 (3, H, W) tensor (see `pixels`).
    """

    def __init__(self, global_crop_size: int, global_crop_scale: tuple[float, float],
                 local_crops: int, local_crop_size: int, local_crop_scale: tuple[float, float]):
        self.local_crops = local_crops
        self.global_1 = _View(global_crop_size, global_crop_scale, blur_p=1.0)
        self.global_2 = _View(global_crop_size, global_crop_scale, blur_p=0.1, solarize_p=SOLARIZE_P)
        self.local = _View(local_crop_size, local_crop_scale, blur_p=0.5)

    @classmethod
    def from_params(cls, p: TrainParams) -> "MultiCrop":
        return cls(p.global_crop_size, p.global_crop_scale, p.local_crops, p.local_crop_size, p.local_crop_scale)

    def __call__(self, image: Image.Image | torch.Tensor) -> list[torch.Tensor]:
        x = pixels(image)
        crops = [self.global_1(x), self.global_2(x)]
        crops += [self.local(x) for _ in range(self.local_crops)]
        return crops
