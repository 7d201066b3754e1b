"""The cache of uint8 tensors: what preprocess writes and train, evaluate and export read."""
