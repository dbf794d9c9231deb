"""Training, export, evaluation and replay: the offline half of the sidecar."""
