"""Weights on disk: our format, GLIP checkpoint conversion, packaged encoders, tuned prompts."""
