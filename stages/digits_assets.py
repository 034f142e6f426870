"""DVC stage digits-assets: the digits profile's real data and its generator (docs/digits.md).

Writes scikit-learn's digits, split into train and test class folders, and trains the digits
generator on the train split (about two minutes on two CPU cores). Setup runs this stage; it
is cached like every stage, so it runs again only when its code changes.
"""
import argparse
from pathlib import Path

from imagenet_sd.datasets import digits
from imagenet_sd.digits import generator

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, required=True, help="folder of the train and test splits")
    parser.add_argument("--model", type=Path, required=True, help="folder of the digits generator")
    args = parser.parse_args()
    written = digits.build(args.data)
    print(f"digits train and test splits {'->' if written else 'already in'} {args.data}")
    generator.main([str(args.model)])
