"""The paper's tables and figures from the experiments, beside the paper's numbers (python -m imagenet_sd.report)."""
