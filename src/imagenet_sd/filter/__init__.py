"""Dataset filters (the clip-filter stage): which synthetic images train-resnet50 reads; one module a
filter (`none`, He et al.'s CLIP filter), listed in registry.py."""
