"""python -m imagenet_sd.report: module tables' command."""
import sys

from imagenet_sd.report.tables import main

sys.exit(main())
