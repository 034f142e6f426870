"""Multi-crop augmentation (DINO's recipe) at tiny sizes."""
import torch
from PIL import Image

from imagenet_sd.augmentation import IMAGENET_MEAN, IMAGENET_STD, MultiCrop


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
