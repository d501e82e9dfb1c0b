"""Batch jobs over REST: durable storage and the runner that feeds the engines."""
