"""Synthetic ImageNet clones with Stable Diffusion (Sariyildiz et al., CVPR 2023).

One module per concept: params (validated settings), classes, wordnet, prompts,
backgrounds, embedded (the tiny local generator), generation, shards, data,
augmentation, training, evaluation, transfer, reports, fixtures.
"""
