"""Bulk inference on Ray Data (`glipv2 batch run`): a folder or table of images, on a local disk or
an object store, through an actor pool running the service's own serving layer, into Parquet
files with one row per input, resumable after any stop.

`inputs` (what to read, each input's stable id), `predictor` (the Ray Data actor: the serving
layer the app builds, answering each input as `/v1/jobs` does), `output` (atomic part files, the
ids already answered), `run` (the pipeline, progress and summary). Needs the `ray` extra.
"""
