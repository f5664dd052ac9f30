"""Codebase A (the shop): publishes ``OrderPlaced`` from its own copy of the class."""
