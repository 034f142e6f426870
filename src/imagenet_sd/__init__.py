"""Synthetic ImageNet clones with Stable Diffusion (Sariyildiz et al., CVPR 2023), with He et al.'s
strategies (ICLR 2023). The subpackages follow the pipeline; the manual is docs/ (mkdocs serve).

- core: params validated into typed objects, errors, atomic files, locks, seeds, devices, torchrun, stage CLI
- models: Stable Diffusion, CLIP, the rehearsal stand-in, the embedded tiny models, finding Hugging Face models
- prompts: class sets, WordNet, the paper's prompts, Places365 backgrounds, class-matched backgrounds
- datasets: tar shards, the plan of which image goes where, real folders, K-shot sets, the kept set, fixtures
- language: He et al.'s language enhancement (a T5 writes each image's sentence)
- generate: sd-generate, prompts -> images in resumable shards, its cost, the published dataset
- filter: He et al.'s CLIP filter
- train: train-resnet50, multi-crop and the training loop
- evaluate: eval-imagenet and eval-transfer (linear probes)
- clip_tune: He et al.'s CLIP classifier tuning
- experiments: the paper's rows and figure points as DVC experiments, and the queue command
- report: the paper's tables and figures from the experiments
"""
