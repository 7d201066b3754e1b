"""The train stage: the loop, the trainee (model, optimiser, step), augmentation, checkpoints,
epoch logs, multi-process training."""
