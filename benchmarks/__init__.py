"""`glipv2 bench`: load, jobs, runtimes and report benchmarks, and probes."""
