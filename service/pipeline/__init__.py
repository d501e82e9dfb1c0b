"""Pipeline helpers of the tasks: images, URLs, text cache, captions, rendering (prompt chunking
is `model_export.processing.chunking`, shared with training)."""
