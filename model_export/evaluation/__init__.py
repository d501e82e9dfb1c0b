"""Evaluation: metrics (AP, mIoU, BLEU, ...) and `glipv2 eval` on fresh world images."""
