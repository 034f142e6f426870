"""eval-imagenet and eval-transfer: the trained encoder on ImageNet's test sets and linear probes on transfer sets."""
