"""The influence computation itself, through kronfluence: the task (loss and measurement), the settings,
fitting the factors, computing pairwise and self-influence scores, rescaling them (relative, cosine), and
the statistics that compare two sets of scores."""
