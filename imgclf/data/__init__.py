"""The preprocess stage: raw archives (CIFAR-10 batches, image folders) decoded into the cache."""
