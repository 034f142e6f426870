"""He et al.'s CLIP filter (clip-filter): which synthetic images train-resnet50 reads."""
