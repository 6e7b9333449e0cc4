"""The Show and Tell model and its Ray Train training loop."""
