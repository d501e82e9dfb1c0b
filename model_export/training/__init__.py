"""Training: the config, examples and batches, the world stream, losses by term, the trainer,
prompt tuning."""
