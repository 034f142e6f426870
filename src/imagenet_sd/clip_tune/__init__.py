"""He et al.'s classifier tuning (clip-tune): a linear head on a frozen CLIP, tuned on the synthetic images."""
