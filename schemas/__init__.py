"""The shapes of showtell's data: the config schema and the im2txt record format."""
