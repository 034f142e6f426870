"""train-resnet50: the ResNet-50 trained from scratch with multi-crop, resumable, on one or many GPUs."""
