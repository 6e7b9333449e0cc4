"""Commands and runners that tie showtell's pipelines together."""
