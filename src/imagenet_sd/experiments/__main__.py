"""python -m imagenet_sd.experiments: module queue's command."""
import sys

from imagenet_sd.experiments.queue import main

sys.exit(main())
