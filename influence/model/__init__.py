"""The model an analysis explains: torchvision's weights by name, local checkpoints, and running the model
outside the influence computation (predictions, BatchNorm statistics)."""
