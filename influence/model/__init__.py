"""The model an analysis explains: which torchvision classifier (`--arch`), its weights by name, local
checkpoints, its attention made trackable, which of its parameters the scores cover, and running the model
outside the influence computation (predictions, BatchNorm statistics)."""

DEFAULT_ARCH = "resnet50"  # the seed's; a constant here so that naming and records need no torchvision
