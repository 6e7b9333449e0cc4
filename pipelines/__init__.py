"""Beam pipelines (preprocess, later evaluation) and the data steps around them."""
