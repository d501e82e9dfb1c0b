"""Training: losses by term, examples and batches, the trainer, prompt tuning."""
