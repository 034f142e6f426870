"""Synthetic ImageNet clones with Stable Diffusion (Sariyildiz et al., CVPR 2023).

One module per concept. The pipeline: params (validated settings), classes, wordnet,
prompts, backgrounds and matching (Places365 scenes, class-matched), embedded (the tiny
local generator), sd_model, plan, generation, shards, samples (the sample grid), data,
augmentation, training, inference and checkpoints (shared by the evaluation stages),
evaluation, val_labels, representation, transfer, transfer_datasets, probes, cog,
fixtures. Around it: experiments (the paper's rows as params; the queue command),
report and figures (tables and figures beside the paper's), paper (its numbers).
"""
