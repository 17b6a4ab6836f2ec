"""The application layer: the composition root (bootstrap) and the use cases the CLI renders."""
