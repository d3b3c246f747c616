"""The gradient index (gradient_index.py): per-layer Kronecker projections of training gradients onto the
fitted factors' eigenvectors (or Gaussian ones), shards on disk, and the two passes that build and query it."""
