"""Models: the architectures and their registry, test-time augmentation, shapes and FLOPs, the
bundle a model travels in, and where models run (device, precision)."""
