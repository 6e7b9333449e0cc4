"""Inference: beam search, the captioner over a checkpoint or an export, and the SavedModel export."""
