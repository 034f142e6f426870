"""Multi-crop augmentation, the training transform of the paper (Sec. 5, "multi-crop [9]").

The recipe is DINO's multi-crop (Caron et al., ICCV 2021: SwAV's multi-crop with
BYOL's photometric augmentations), in the variant `global_crop_style` picks:

- `global_crops` large crops (`global_crop_size`, area fraction in `global_crop_scale`),
- `local_crops` small crops (`local_crop_size`, area in `local_crop_scale`),
- on every crop: horizontal flip, colour jitter (p=0.8), grayscale (p=0.2);
- Gaussian blur with p=0.5 on locals, and on the global crops:
  - `trex` (the paper's authors' code, naver/trex): blur p=0.2 and solarisation
    p=0.2 on every global crop;
  - `dino`: an asymmetric pair, blur p=1.0 on global crop 1, p=0.1 plus
    solarisation p=0.2 on global crop 2 (one nearly always blurred, the other often
    sharp or solarised, so that together they cover both kinds of distortion).

In supervised training every crop carries the label of its image.

The third style, `deit`, is not multi-crop's: DeiT's training transform (timm's
`create_transform` as facebookresearch/deit calls it), for the ViT-B recipe: a bicubic
RandomResizedCrop, flip, timm's RandAugment (`randaugment`) in place of colour jitter,
normalisation, then timm's random erasing (`random_erasing`, per-pixel noise). It runs
in the loader workers only (`MultiCrop.drawable` is false: RandAugment has no batched GPU form here).

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

import functools
import io
import math

import numpy as np
import torch
import torch.nn.functional as nnf
from PIL import Image, ImageOps
from torchvision import transforms as T
from torchvision.transforms.v2 import functional as F

from imagenet_sd.core.errors import UserError
from imagenet_sd.core.params import TrainParams
from imagenet_sd.datasets.transforms import IMAGENET_MEAN, IMAGENET_STD

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


def adjust_hue(image: torch.Tensor, hue_factor: float | torch.Tensor) -> torch.Tensor:
    """torchvision's adjust_hue of a float RGB (..., 3, H, W) image in [0, 1], in a fifth of the time.
    `hue_factor`: a number, or a (..., 1, 1) tensor of one factor per image.

    HSV keeps the largest channel V and the spread C = max - min; turning the hue only
    moves which channel sits where between them, so the image is rebuilt from V, C and
    the turned hue without forming S or going back through HSV's six sectors. Sectors
    are picked with lerp by a 0/1 mask (exact at 0 and 1), which is several times
    faster than torch.where on the CPU.
    """
    r, g, b = image.unbind(-3)
    value = torch.maximum(torch.maximum(r, g), b)
    chroma = value - torch.minimum(torch.minimum(r, g), b)
    scale = chroma.clamp(min=1e-12).reciprocal_()       # grey pixels (C = 0) stay grey, whatever their hue
    # Hue in sixths of a turn, in [-1, 5): torchvision's formula for the sector of the largest
    # channel, R before G before B when two are equal (where both formulas agree anyway).
    hue = torch.lerp((r - g).mul_(scale).add_(4), (b - r).mul_(scale).add_(2), (value == g).float())
    hue = torch.lerp(hue, (g - b).mul_(scale), (value == r).float())
    k = (hue + 6 * hue_factor).unsqueeze(-3) + _HUE_OFFSETS
    k.sub_(k.div(6).floor_().mul_(6))                   # mod 6; remainder_ is 3x slower
    k = torch.minimum(k, 4 - k).clamp_(0, 1)
    return torch.addcmul(value.unsqueeze(-3), chroma.unsqueeze(-3), k, value=-1)


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


def _colour_jitter(image: torch.Tensor, order: list[int], factors: list[float]) -> torch.Tensor:
    """ColorJitter(0.4, 0.4, 0.2, 0.1) with its draws (order, then factors) applied to a float image."""
    brightness, contrast, saturation, hue = factors
    for op in order:
        if op == 0:
            image = F.adjust_brightness_image(image, brightness)
        elif op == 1:
            image = F.adjust_contrast_image(image, contrast)
        elif op == 2:
            image = F.adjust_saturation_image(image, saturation)
        else:
            image = adjust_hue(image, hue)
    return image


# One crop's random draws, in torchvision's order, as one row of floats (all exact in float32:
# integers below 2^24 and float32 draws). The CPU path applies them at once; the device path
# draws them in the loader workers and applies a whole batch of them on the GPU.
TOP, LEFT, HEIGHT, WIDTH, FLIP, JITTER_ON, ORDER, FACTORS, GRAY, SIGMA, SOLARIZE = (
    0, 1, 2, 3, 4, 5, slice(6, 10), slice(10, 14), 14, 15, 16)
DRAW_SIZE = 17


class _View:
    """One kind of crop: RandomResizedCrop (bicubic) -> flip -> jitter -> grayscale -> blur
    [-> solarize] -> normalise, with torchvision's random draws in torchvision's order."""
    drawable = True          # its draws can be made apart from the pixels (the device path)

    def __init__(self, size: int, scale: tuple[float, float], blur_p: float, solarize_p: float | None = None):
        self.size, self.scale = size, tuple(scale)
        self.blur_p, self.solarize_p = blur_p, solarize_p

    def draw(self, height: int, width: int) -> torch.Tensor:
        """This view's draws for an image of `height` x `width` pixels (DRAW_SIZE floats)."""
        d = torch.zeros(DRAW_SIZE)
        shape_only = torch.empty(1, dtype=torch.uint8).expand(3, height, width)    # no pixels needed
        d[TOP], d[LEFT], d[HEIGHT], d[WIDTH] = T.RandomResizedCrop.get_params(shape_only, list(self.scale),
                                                                             list(CROP_RATIO))
        d[FLIP] = float(torch.rand(1) < FLIP_P)
        if not JITTER_P < torch.rand(1):                    # RandomApply's test
            order, *factors = T.ColorJitter.get_params(JITTER.brightness, JITTER.contrast, JITTER.saturation,
                                                       JITTER.hue)
            d[JITTER_ON], d[ORDER], d[FACTORS] = 1.0, order.float(), torch.tensor(factors)
        d[GRAY] = float(torch.rand(1) < GRAYSCALE_P)
        if not self.blur_p < torch.rand(1):
            d[SIGMA] = torch.empty(1).uniform_(*BLUR_SIGMA).item()
        if self.solarize_p is not None:
            d[SOLARIZE] = float(torch.rand(1).item() < self.solarize_p)
        return d

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return self.apply(image, self.draw(*image.shape[-2:]).tolist())

    def apply(self, image: torch.Tensor, d: list[float]) -> torch.Tensor:
        top, left, height, width = (int(v) for v in d[:4])
        crop = F.resized_crop_image(image, top, left, height, width, [self.size, self.size],
                                    interpolation=T.InterpolationMode.BICUBIC, antialias=True)
        if d[FLIP]:
            crop = crop.flip(-1)
        x = crop.float().div_(255)
        if d[JITTER_ON]:
            x = _colour_jitter(x, [int(v) for v in d[ORDER]], d[FACTORS])
        if d[GRAY]:
            x = F.rgb_to_grayscale_image(x, num_output_channels=3)
        if d[SIGMA]:
            x = gaussian_blur(x, d[SIGMA])
        if d[SOLARIZE]:
            x = torch.where(x >= SOLARIZE_THRESHOLD, 1 - x, x)
        return x.sub(_MEAN).div_(_STD)


class _DeitView:
    """DeiT's crop: RandomResizedCrop (bicubic) -> flip -> RandAugment -> normalise -> random erasing.

    RandAugment and random erasing are timm's (hparams as timm's create_transform sets them for
    DeiT: translations up to 45% of the crop, ImageNet's mean as fill, bicubic); they draw from
    Python's and NumPy's generators, which the loader seeds in each worker and the training loop
    every epoch, so a seed still gives the same crops.
    """
    drawable = False

    def __init__(self, size: int, scale: tuple[float, float], randaugment: str, erasing: float):
        self.size, self.scale = size, tuple(scale)
        self.augment = _randaugment(randaugment, size) if randaugment else None
        self.erase = None
        if erasing:
            from timm.data.random_erasing import RandomErasing
            self.erase = RandomErasing(erasing, mode="pixel", max_count=1, device="cpu")

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        shape_only = torch.empty(1, dtype=torch.uint8).expand(3, *image.shape[-2:])
        top, left, height, width = T.RandomResizedCrop.get_params(shape_only, list(self.scale), list(CROP_RATIO))
        crop = F.resized_crop_image(image, top, left, height, width, [self.size, self.size],
                                    interpolation=T.InterpolationMode.BICUBIC, antialias=True)
        if torch.rand(1) < FLIP_P:
            crop = crop.flip(-1)
        if self.augment is not None:
            augmented = self.augment(Image.fromarray(crop.permute(1, 2, 0).contiguous().numpy()))
            crop = torch.from_numpy(np.array(augmented)).permute(2, 0, 1)
        x = crop.float().div_(255).sub_(_MEAN).div_(_STD)
        return self.erase(x) if self.erase is not None else x


def _randaugment(config: str, size: int):
    """timm's RandAugment of `config` (e.g. rand-m9-mstd0.5-inc1) for `size`-pixel crops."""
    from timm.data.auto_augment import rand_augment_transform
    hparams = {"translate_const": int(size * 0.45), "interpolation": Image.BICUBIC,
               "img_mean": tuple(min(255, round(255 * m)) for m in IMAGENET_MEAN)}
    try:
        transform = rand_augment_transform(config, hparams)
    except (AssertionError, ValueError, KeyError, IndexError) as exc:
        raise UserError(f"train.randaugment = {config!r}: timm cannot read it ({exc or type(exc).__name__}); "
                        "write it as timm does, e.g. rand-m9-mstd0.5-inc1") from None
    for op in transform.ops:
        if op.name.startswith("Posterize"):
            op.aug_fn = _posterize       # this op only; timm's table is left as it is
    return transform


def _posterize(image: Image.Image, bits_to_keep: int, **_) -> Image.Image:
    """timm's posterize as DeiT trained with it: 0 bits (PosterizeIncreasing at magnitude 10, which
    rand-m9-mstd0.5-inc1 reaches when its noise adds 1) makes the image black, as Pillow did then;
    Pillow 11 and later refuse 0 bits (a ValueError in the loader, found by an end-to-end run)."""
    if bits_to_keep >= 8:
        return image
    if bits_to_keep <= 0:
        return Image.new(image.mode, image.size)
    return ImageOps.posterize(image, bits_to_keep)


def global_views(size: int, scale: tuple[float, float], count: int, style: str) -> list[_View]:
    """The global crops of a recipe.

    - "trex" (the paper's authors, naver/trex): every global crop blurred with p 0.2 and
      solarised with p 0.2;
    - "dino" (Caron et al.): the asymmetric pair, blurred with p 1.0, then blurred with
      p 0.1 and solarised with p 0.2, the pair repeated for more crops.
    """
    if style == "trex":
        return [_View(size, scale, blur_p=0.2, solarize_p=SOLARIZE_P) for _ in range(count)]
    pair = (_View(size, scale, blur_p=1.0), _View(size, scale, blur_p=0.1, solarize_p=SOLARIZE_P))
    return [pair[i % 2] for i in range(count)]


class MultiCrop:
    """Image -> [global 1, ..., global g, local 1, ..., local n] normalised float32 tensors.

    The image is a PIL image or a uint8 (3, H, W) tensor (see `pixels`). `draw` gives the
    random draws alone, for `DeviceMultiCrop` to apply on the GPU.
    """

    def __init__(self, global_crop_size: int, global_crop_scale: tuple[float, float],
                 local_crops: int, local_crop_size: int, local_crop_scale: tuple[float, float],
                 global_crops: int = 2, global_crop_style: str = "dino", randaugment: str = "",
                 random_erasing: float = 0.0):
        self.global_crops, self.local_crops = global_crops, local_crops
        if global_crop_style == "deit":      # every crop, global or local, is DeiT's
            self.views = [_DeitView(global_crop_size, global_crop_scale, randaugment, random_erasing)] * global_crops
            self.views += [_DeitView(local_crop_size, local_crop_scale, randaugment, random_erasing)] * local_crops
        else:
            self.views = global_views(global_crop_size, global_crop_scale, global_crops, global_crop_style)
            self.views += [_View(local_crop_size, local_crop_scale, blur_p=0.5)] * local_crops
        # Whether `draw` can make every view's draws apart from the pixels (the device path).
        self.drawable = all(view.drawable for view in self.views)

    @classmethod
    def from_params(cls, p: TrainParams) -> "MultiCrop":
        return cls(p.global_crop_size, p.global_crop_scale, p.local_crops, p.local_crop_size, p.local_crop_scale,
                   p.global_crops, p.global_crop_style, p.randaugment, p.random_erasing)

    def __call__(self, image: Image.Image | torch.Tensor) -> list[torch.Tensor]:
        x = pixels(image)
        return [view(x) for view in self.views]

    def draw(self, height: int, width: int) -> torch.Tensor:
        """(views, DRAW_SIZE): the same draws, from the same generator, as `__call__` makes."""
        return torch.stack([view.draw(height, width) for view in self.views])


# --------------------------------------------------------------------------- on the GPU
# The same recipe for a whole batch at once on the training device (`train.augment_device`):
# the loader workers only read each JPEG's header and make the draws (`MultiCrop.draw`, the
# same draws as the CPU path from the same seed); the device decodes the batch
# (torchvision.io.decode_jpeg, nvJPEG on a GPU) and cuts, resizes and colours every crop
# of it in a few batched kernels. What differs from the CPU path is the resize filter:
# torchvision.ops.roi_align averages ceil(crop/output) x ceil(crop/output) bilinear samples
# an output pixel (an area filter when shrinking), where the CPU path uses an antialiased
# bicubic, and nothing is rounded to 8 bits after it. Everything after the resize is the
# same arithmetic (tests/test_augmentation.py).

def encoded_jpeg(data: bytes) -> tuple[torch.Tensor, int, int] | None:
    """(JPEG bytes as a uint8 tensor, height, width) for decode_jpeg, reading the header only;
    None if it is not an image. The rare image that is not an RGB or grey JPEG (ImageNet holds
    a few PNGs and CMYK JPEGs) is re-encoded as one, so the device decodes every image."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.format != "JPEG" or image.mode not in ("RGB", "L"):
                buffer = io.BytesIO()
                image.convert("RGB").save(buffer, "JPEG", quality=95)
                data = buffer.getvalue()
            width, height = image.size
    except (OSError, ValueError, Image.DecompressionBombError):
        return None
    return torch.frombuffer(bytearray(data), dtype=torch.uint8), height, width


def read_encoded(path) -> tuple[torch.Tensor, int, int]:
    """An image file as `encoded_jpeg` gives it (a real training folder on the device path)."""
    encoded = encoded_jpeg(path.read_bytes())
    if encoded is None:
        raise UserError(f"{path}: not a readable image; remove it from the training folder")
    return encoded


class DrawCrops:
    """The loader's transform on the device path: encoded image -> (JPEG bytes, draws)."""

    def __init__(self, multicrop: MultiCrop):
        self.multicrop = multicrop

    def __call__(self, encoded: tuple[torch.Tensor, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        jpeg, height, width = encoded
        return jpeg, self.multicrop.draw(height, width)


def collate_encoded(batch: list) -> tuple[tuple[list[torch.Tensor], torch.Tensor], torch.Tensor]:
    """DataLoader collate of ((jpeg, draws), label) samples: JPEGs differ in length, so a list."""
    return ([item[0][0] for item in batch], torch.stack([item[0][1] for item in batch])), \
        torch.tensor([item[1] for item in batch])


def _grey(x: torch.Tensor) -> torch.Tensor:
    """torchvision's luma (..., 1, H, W) of float RGB (..., 3, H, W)."""
    r, g, b = x.unbind(-3)
    return r.mul(0.2989).add_(g, alpha=0.587).add_(b, alpha=0.114).unsqueeze(-3)


def _blend(x: torch.Tensor, other: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    return (x * ratio + other * (1 - ratio)).clamp_(0, 1)


def _jitter_op(op: int, x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """ColorJitter's op `op` (brightness, contrast, saturation, hue) with one factor per image."""
    f = factor.view(-1, 1, 1, 1)
    if op == 0:
        return (x * f).clamp_(0, 1)
    if op == 1:
        return _blend(x, _grey(x).mean(dim=(-3, -2, -1), keepdim=True), f)
    if op == 2:
        return _blend(x, _grey(x), f)
    return adjust_hue(x, f.view(-1, 1, 1))


def blur_batch(x: torch.Tensor, sigma: torch.Tensor, kernel_size: int = BLUR_KERNEL) -> torch.Tensor:
    """`gaussian_blur` of (K, C, H, W) crops, each with its own sigma (K,)."""
    reach = kernel_size // 2
    taps = torch.arange(reach + 1, device=x.device, dtype=x.dtype)
    weights = torch.exp(-0.5 * (taps / sigma.view(-1, 1)) ** 2)                    # (K, reach + 1)
    weights = weights / (weights[:, :1] + 2 * weights[:, 1:].sum(1, keepdim=True))
    w = weights.view(-1, reach + 1, 1, 1, 1).unbind(1)
    height, width = x.shape[-2:]
    padded = nnf.pad(x, [reach] * 4, mode="reflect")
    rows = padded[..., reach:reach + width] * w[0]
    for d in range(1, reach + 1):
        rows += (padded[..., reach - d:reach - d + width] + padded[..., reach + d:reach + d + width]) * w[d]
    out = rows[..., reach:reach + height, :] * w[0]
    for d in range(1, reach + 1):
        out += (rows[..., reach - d:reach - d + height, :] + rows[..., reach + d:reach + d + height, :]) * w[d]
    return out


@functools.lru_cache(maxsize=None)
def _normaliser(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return _MEAN.to(device), _STD.to(device)


def photometric_batch(x: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
    """Flip, jitter, grayscale, blur, solarise and normalise crops x (K, 3, s, s) in [0, 1] by
    their draws (K, DRAW_SIZE), on x's device: `_View.apply` after the resize, for a batch.

    Every operation runs on the whole batch and `torch.where` keeps it for the crops whose
    draws ask for it: no indexing by a mask, so nothing waits for the GPU to say how many
    (a host sync). Jitter applies its four operations in each crop's own order, so each of
    the four steps computes all four operations: 4x the arithmetic of one order, a few ms
    a batch on a GPU against a ResNet-50 step.
    """
    def chosen(mask: torch.Tensor) -> torch.Tensor:
        return mask.view(-1, 1, 1, 1)

    x = torch.where(chosen(draws[:, FLIP] > 0), x.flip(-1), x)
    jittered, order, factors = draws[:, JITTER_ON] > 0, draws[:, ORDER], draws[:, FACTORS]
    for step in range(4):
        for op in range(4):
            x = torch.where(chosen(jittered & (order[:, step] == op)), _jitter_op(op, x, factors[:, op]), x)
    x = torch.where(chosen(draws[:, GRAY] > 0), _grey(x).expand_as(x), x)
    sigma = draws[:, SIGMA]
    x = torch.where(chosen(sigma > 0), blur_batch(x, sigma.clamp(min=BLUR_SIGMA[0])), x)
    x = torch.where(chosen(draws[:, SOLARIZE] > 0) & (x >= SOLARIZE_THRESHOLD), 1 - x, x)
    mean, std = _normaliser(x.device)
    return (x - mean) / std


def crop_batch(images: torch.Tensor, draws: torch.Tensor, size: int) -> torch.Tensor:
    """Cut and resize crops (K, 3, size, size) in [0, 1] from float images (B, 3, H, W) in
    [0, 255]; draws (K, DRAW_SIZE), view-major (crop k is of image k mod B)."""
    from torchvision.ops import roi_align
    index = torch.arange(len(draws), device=draws.device) % len(images)
    top, left, height, width = draws[:, TOP], draws[:, LEFT], draws[:, HEIGHT], draws[:, WIDTH]
    boxes = torch.stack([index.to(draws.dtype), left, top, left + width, top + height], dim=1)
    return roi_align(images, boxes, output_size=size, spatial_scale=1.0, sampling_ratio=-1, aligned=True) / 255


class DeviceMultiCrop:
    """A batch of (JPEG bytes, draws) -> the crops `MultiCrop` makes, computed on `device`."""

    def __init__(self, multicrop: MultiCrop, device: torch.device):
        self.views, self.device = multicrop.views, device
        self.failed = 0          # images the device could not decode, left out of their batch

    def decode(self, jpegs: list[torch.Tensor]) -> tuple[torch.Tensor, list[int]]:
        """(float images (B, 3, H, W) in [0, 255], indices of the decoded JPEGs)."""
        from torchvision.io import ImageReadMode, decode_jpeg
        try:
            images, kept = decode_jpeg(jpegs, mode=ImageReadMode.RGB, device=self.device), list(range(len(jpegs)))
        except RuntimeError:     # one bad image fails the batch: decode one by one, leave out the bad
            images, kept = [], []
            for i, jpeg in enumerate(jpegs):
                try:
                    images.append(decode_jpeg(jpeg, mode=ImageReadMode.RGB, device=self.device))
                    kept.append(i)
                except RuntimeError:
                    self.failed += 1
        if not images:
            return torch.empty(0, 3, 1, 1, device=self.device), kept
        if len({i.shape for i in images}) == 1:          # generated images: one size
            return torch.stack(images).float(), kept
        height, width = max(i.shape[-2] for i in images), max(i.shape[-1] for i in images)
        # Edge-replicated to one size: roi_align's samples next to an image's edge then read its edge.
        return torch.stack([nnf.pad(i[None].float(), (0, width - i.shape[-1], 0, height - i.shape[-2]),
                                    mode="replicate")[0] for i in images]), kept

    def __call__(self, jpegs: list[torch.Tensor], draws: torch.Tensor) -> tuple[list[torch.Tensor], list[int]]:
        """(crops in MultiCrop's order, each (B', 3, s, s); indices of the images kept).

        `draws` come from the loader in pinned memory, so moving them is asynchronous.
        """
        images, kept = self.decode(jpegs)
        if len(kept) < len(jpegs):
            draws = draws[kept]
        draws = draws.to(self.device, non_blocking=True)
        crops: list[torch.Tensor] = []
        start = 0
        while start < len(self.views):        # consecutive views of one size share the kernels
            end = start
            while end < len(self.views) and self.views[end].size == self.views[start].size:
                end += 1
            d = draws[:, start:end].transpose(0, 1).reshape(-1, DRAW_SIZE)
            x = photometric_batch(crop_batch(images, d, self.views[start].size), d)
            crops += list(x.view(end - start, len(kept), *x.shape[1:]).unbind(0))
            start = end
        return crops, kept
