"""Measuring what a build computes against the PyTorch ToMe model: calibration images, logit validation with
one threshold checker, and merge decisions with their agreement measures. Shared by the targets and the bench."""
