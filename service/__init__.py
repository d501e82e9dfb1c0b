"""The GLIPv2 inference service (HTTP app, batcher, runtimes)."""
