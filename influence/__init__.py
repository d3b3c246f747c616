"""The machinery under the suite's commands (analyze.py, gradient_index.py, top_influences.py, ...): each
sub-package is one part of an influence analysis, and imports run one way, down: nothing here imports a
top-level script. data: images, layouts, queries, the demo; model: weights, checkpoints, running the model;
analysis: the kronfluence task, settings, factors, scores and their normalisation; results: names, records,
score files, locks, preflight; index: the gradient index; explorer: figures and the static pages; runtime:
devices, torchrun, command-line conventions. docs/design.md maps it."""
