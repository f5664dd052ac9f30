"""Live schemas, subscriber side (service ``billing``): its own copy of ``OrderPlaced``."""
