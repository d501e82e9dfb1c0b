"""Pipeline helpers of the tasks: images, URLs, prompt chunking, text cache, captions, rendering."""
