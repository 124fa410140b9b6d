"""Training: the step, the runtimes (local and Ray), the loop and its hooks, evaluation, on-device planning."""
