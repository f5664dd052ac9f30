"""Live schemas, publisher side (the shop): versions of its own ``OrderPlaced``."""
