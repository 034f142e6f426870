"""python -m imagenet_sd.report: module command."""
import sys

from imagenet_sd.report.command import main

sys.exit(main())
