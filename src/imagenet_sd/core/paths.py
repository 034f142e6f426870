"""Where the repository's own data files are: class lists, the Places365 list, the paper's numbers,
the shipped model configs (data/ beside src/). One constant, so a move of the package moves one line."""
from pathlib import Path

DATA = Path(__file__).resolve().parents[3] / "data"
