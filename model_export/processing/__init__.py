"""Pre- and post-processing as pure functions, shared by training, evaluation and the service."""
