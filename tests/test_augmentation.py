"""Multi-crop augmentation (DINO's recipe) at tiny sizes."""
import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms.v2 import functional as F

from imagenet_sd.train.augmentation import (
    BLUR_KERNEL,
    DRAW_SIZE,
    IMAGENET_MEAN,
    IMAGENET_STD,
    DeviceMultiCrop,
    DrawCrops,
    MultiCrop,
    adjust_hue,
    collate_encoded,
    encoded_jpeg,
    gaussian_blur,
    photometric_batch,
)


def picture(size=48):
    """A picture with structure (a gradient and a square), so that crops differ."""
    image = Image.new("RGB", (size, size))
    image.putdata([(4 * x, 4 * y, 128) for y in range(size) for x in range(size)])
    image.paste((250, 20, 20), (8, 8, 24, 24))
    return image


def test_globals_first_then_locals_with_their_sizes():
    crops = MultiCrop(32, (0.4, 1.0), 3, 16, (0.05, 0.4))(picture())
    assert [tuple(c.shape) for c in crops] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 3
    assert all(c.dtype == torch.float32 for c in crops)


def test_no_local_crops_is_the_two_crop_recipe():
    crops = MultiCrop(32, (0.4, 1.0), 0, 16, (0.05, 0.4))(picture())
    assert [tuple(c.shape) for c in crops] == [(3, 32, 32)] * 2


def test_crops_are_imagenet_normalised():
    # A grey image stays grey (R = G = B) under every augmentation, brightness jitter and
    # solarisation included; only undoing ImageNet's per-channel mean/std shows that.
    grey = Image.new("RGB", (40, 40), (127, 127, 127))
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    torch.manual_seed(0)
    for _ in range(5):
        for crop in MultiCrop(32, (0.4, 1.0), 2, 16, (0.05, 0.4))(grey):
            pixels = crop * std + mean
            assert pixels.min() >= -0.01 and pixels.max() <= 1.01
            assert (pixels - pixels.mean(dim=0)).abs().max() < 0.02
            assert not torch.allclose(crop[0], crop[2], atol=0.1)  # normalised: channels differ


def test_random_but_reproducible_from_the_torch_seed():
    transform = MultiCrop(32, (0.2, 1.0), 2, 16, (0.05, 0.4))
    torch.manual_seed(1)
    first = transform(picture())
    torch.manual_seed(1)
    again = transform(picture())
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[0], first[1])  # two views of the image, not one view twice


# --------------------------------------------------------------------------- the tensor implementation
# MultiCrop runs the recipe on tensors (see augmentation.py). These check it against
# torchvision: each of its own operations, and the whole against the recipe as
# torchvision transforms on PIL images (how it was first written), draw for draw.

def photo(size=96, seed=0):
    """A smooth random colour picture with grain: every hue, no flat areas."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, 4, 4, generator=g)
    smooth = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)[0]
    pixels = (smooth * 255 + torch.randn(3, size, size, generator=g) * 8).clamp(0, 255).round().byte()
    return Image.fromarray(pixels.permute(1, 2, 0).numpy())


def pil_recipe(global_size, global_scale, local_crops, local_size, local_scale):
    """The recipe as torchvision transforms on PIL images (augmentation.py before its tensor rewrite)."""
    def view(size, scale, blur_p, *extra):
        return T.Compose([
            T.RandomResizedCrop(size, scale=scale, interpolation=T.InterpolationMode.BICUBIC),
            T.RandomHorizontalFlip(p=0.5),
            T.RandomApply([T.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)], p=0.8),
            T.RandomGrayscale(p=0.2),
            T.RandomApply([T.GaussianBlur(13, sigma=(0.1, 2.0))], p=blur_p),
            *extra, T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    g1 = view(global_size, global_scale, 1.0)
    g2 = view(global_size, global_scale, 0.1, T.RandomSolarize(128, p=0.2))
    local = view(local_size, local_scale, 0.5)
    return lambda image: [g1(image), g2(image)] + [local(image) for _ in range(local_crops)]


def test_hue_is_torchvisions():
    torch.manual_seed(0)
    image = torch.rand(3, 24, 20)
    image[:, :4] = 0.5                      # grey: no hue
    image[0, 4:8] = image[1, 4:8]           # ties for the largest channel
    image[2, 8:12] = image[1, 8:12]
    for factor in (-0.5, -0.1, -0.03, 0.0, 0.07, 0.1, 0.5):
        assert torch.allclose(adjust_hue(image, factor), F.adjust_hue(image, factor), atol=1e-5), factor


def test_blur_is_torchvisions_13_tap_gaussian():
    torch.manual_seed(0)
    image = torch.rand(3, 20, 26)
    for sigma in (0.1, 0.4, 1.0, 1.7, 2.0):
        expected = F.gaussian_blur(image, [BLUR_KERNEL, BLUR_KERNEL], [sigma, sigma])
        assert torch.allclose(gaussian_blur(image, sigma), expected, atol=1e-5), sigma


def test_same_draws_and_nearly_the_same_pixels_as_the_pil_recipe():
    # Same seed, same crops, flips, jitter factors, blur radii and solarisations: the images
    # differ by rounding only (PIL rounds to 8 bits after each step, its hue to 256 levels;
    # PIL's and torch's bicubic resizes differ by up to one level). A wrong probability,
    # range or order would move whole crops by far more (other draws: a mean of 0.1 or more).
    args = (48, (0.25, 1.0), 4, 24, (0.05, 0.25))
    ours, reference = MultiCrop(*args), pil_recipe(*args)
    std = torch.tensor(IMAGENET_STD)[:, None, None]
    for seed in range(8):
        image = photo(seed=seed)
        torch.manual_seed(seed)
        got = ours(image)
        torch.manual_seed(seed)
        expected = reference(image)
        for a, b in zip(got, expected):
            difference = ((a - b) * std).abs()      # in units of the [0, 1] pixel range
            assert difference.mean() < 0.025 and difference.max() < 0.15, (seed, difference.mean(), difference.max())


def test_takes_a_uint8_tensor_like_a_pil_image():
    image = photo()
    tensor = torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous()   # as decode_jpeg gives it
    transform = MultiCrop(32, (0.25, 1.0), 2, 16, (0.05, 0.25))
    torch.manual_seed(3)
    from_pil = transform(image)
    torch.manual_seed(3)
    from_tensor = transform(tensor)
    assert all(torch.equal(a, b) for a, b in zip(from_pil, from_tensor))
    assert [tuple(c.shape) for c in transform(image.convert("L"))] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 2
    with pytest.raises(TypeError, match="uint8"):
        transform(tensor.float())


# --------------------------------------------------------------------------- the device path
# DeviceMultiCrop is what `train.augment_device: cuda` runs on the GPU; here it runs on the
# CPU, the same code with CPU kernels.



def jpeg_bytes(image: Image.Image, fmt="JPEG", **options) -> bytes:
    import io
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def trex(global_size=32, local_crops=3):
    return MultiCrop(global_size, (0.25, 1.0), local_crops, 16, (0.05, 0.25), global_crops=1,
                     global_crop_style="trex")


def test_the_device_path_draws_what_the_cpu_path_draws_and_makes_close_crops():
    multicrop, device = trex(), DeviceMultiCrop(trex(), torch.device("cpu"))
    data = [jpeg_bytes(photo(96, seed), quality=95) for seed in range(4)]
    for seed in range(3):
        torch.manual_seed(seed)
        on_cpu = [multicrop(Image.open(__import__("io").BytesIO(d)).convert("RGB")) for d in data]
        torch.manual_seed(seed)
        samples = [(DrawCrops(multicrop)(encoded_jpeg(d)), label) for label, d in enumerate(data)]
        (jpegs, draws), labels = collate_encoded(samples)
        assert draws.shape == (4, 4, DRAW_SIZE) and labels.tolist() == [0, 1, 2, 3]
        crops, kept = device(jpegs, draws)
        assert kept == [0, 1, 2, 3]
        assert [tuple(c.shape) for c in crops] == [(4, 3, 32, 32)] + [(4, 3, 16, 16)] * 3
        for view, batch in enumerate(crops):
            for i in range(4):
                # The resize filters differ (roi_align's area average vs antialiased bicubic): a few
                # grey levels on this grainy picture, against ~1.0 between two different crops.
                assert (batch[i] - on_cpu[i][view]).abs().mean() < 0.08


def test_the_batched_colour_ops_compute_what_the_per_crop_ones_do():
    """After the resize the device path is the CPU path's arithmetic, crop for crop."""
    multicrop = MultiCrop(24, (0.25, 1.0), 4, 24, (0.05, 0.25), global_crops=2, global_crop_style="dino")
    torch.manual_seed(5)
    pixels = torch.stack([torch.from_numpy(np.array(photo(24, seed))).permute(2, 0, 1) for seed in range(6)])
    draws = torch.stack([multicrop.draw(24, 24) for _ in range(6)]).reshape(-1, DRAW_SIZE)
    draws[:, 0:2], draws[:, 2:4] = 0, 24           # whole-image crops at their own size: no resize
    images = pixels.repeat(len(multicrop.views), 1, 1, 1)
    batched = photometric_batch(images.float() / 255, draws)
    view = multicrop.views[0]
    for k in range(len(draws)):
        alone = view.apply(images[k], draws[k].tolist())
        assert (batched[k] - alone).abs().max() < 1e-4, k
    # The draws used every op: jitter, grey, blur, solarise, flip.
    from imagenet_sd.train.augmentation import FLIP, GRAY, JITTER_ON, SIGMA, SOLARIZE
    assert all(draws[:, c].gt(0).any() for c in (FLIP, GRAY, JITTER_ON, SIGMA, SOLARIZE))


def test_device_and_cpu_crops_have_the_same_statistics():
    """Per-channel mean and spread of 48 global crops (the filters' difference is no bias)."""
    multicrop = trex(local_crops=2)
    device = DeviceMultiCrop(multicrop, torch.device("cpu"))
    data = [jpeg_bytes(photo(64, seed), quality=95) for seed in range(48)]
    torch.manual_seed(0)
    on_cpu = torch.stack([multicrop(Image.open(__import__("io").BytesIO(d)).convert("RGB"))[0] for d in data])
    torch.manual_seed(0)                        # the same draws: only the resize filter differs
    (jpegs, draws), _ = collate_encoded([(DrawCrops(multicrop)(encoded_jpeg(d)), 0) for d in data])
    on_device = device(jpegs, draws)[0][0]
    for stat in (lambda x: x.mean(dim=(0, 2, 3)), lambda x: x.std(dim=(0, 2, 3))):
        assert torch.allclose(stat(on_device), stat(on_cpu), atol=0.02), (stat(on_device), stat(on_cpu))


def test_the_device_path_leaves_out_what_it_cannot_decode_and_reads_any_image():
    multicrop = trex(local_crops=0)
    good = jpeg_bytes(photo(40), quality=90)
    png = jpeg_bytes(photo(40), fmt="PNG")
    cmyk = jpeg_bytes(photo(40).convert("CMYK"), quality=90)
    assert encoded_jpeg(b"not an image") is None
    encoded = [encoded_jpeg(d) for d in (good, png, cmyk)]
    assert [e[1:] for e in encoded] == [(40, 40)] * 3
    broken = encoded_jpeg(good)[0].clone()
    broken[len(broken) // 3:] = 0                # a header that parses, data that does not
    jpegs = [encoded[0][0], broken, encoded[1][0], encoded[2][0]]
    draws = torch.stack([multicrop.draw(40, 40) for _ in jpegs])
    device = DeviceMultiCrop(multicrop, torch.device("cpu"))
    crops, kept = device(jpegs, draws)
    assert kept == [0, 2, 3] and device.failed == 1 and crops[0].shape == (3, 3, 32, 32)
