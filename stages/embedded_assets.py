"""DVC stage embedded-assets: the embedded profile's tiny Stable Diffusion, every registered family's tiny
model (models/families/: the tiny SDXL, SD3, PixArt-Sigma, FLUX.1; any-family generation), tiny CLIP
(clip-filter, clip-tune), tiny OpenCLIP with a ResNet image tower (their `open_clip:` path), tiny T5 (language
enhancement, prompt le) and fixture datasets.

Setup runs this stage. Its outputs are the same bytes on every machine (fixed seeds),
and they are in DVC's cache, from which queued and `--temp` experiments check them out
into their temporary copies of the repository, which git (ignoring them) leaves without.
"""
import argparse
from pathlib import Path

from imagenet_sd.datasets import fixtures
from imagenet_sd.models import embedded, tiny_clip, tiny_families, tiny_open_clip, tiny_t5

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", type=Path, required=True, help="folder of the tiny Stable Diffusion")
    parser.add_argument("--fixtures", type=Path, required=True, help="folder of the fixture datasets")
    parser.add_argument("--clip", type=Path, required=True, help="folder of the tiny CLIP (clip-filter stage)")
    parser.add_argument("--open-clip", type=Path, required=True,
                        help="folder of the tiny OpenCLIP (clip-filter and clip-tune's open_clip: path)")
    parser.add_argument("--t5", type=Path, required=True, help="folder of the tiny T5 (language enhancement)")
    parser.add_argument("--families", type=Path, required=True,
                        help="folder to hold each family's tiny-<family> (tiny-sd too: --model's folder there)")
    args = parser.parse_args()
    embedded.main([str(args.model)])
    tiny_clip.main([str(args.clip)])
    tiny_open_clip.main([str(args.open_clip)])
    tiny_t5.main([str(args.t5)])
    tiny_families.main([str(args.families)])
    if not fixtures.is_current(args.fixtures):
        fixtures.build(args.fixtures)
    print(f"fixture datasets -> {args.fixtures}")
