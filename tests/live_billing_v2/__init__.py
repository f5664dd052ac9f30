"""Live schemas with versions: billing's copy of ``OrderPlaced`` at version 2.

``total_cents`` (version 1, what the shop still publishes) became ``amount_cents``.
:mod:`.upcasted` registers the upcaster from version 1, :mod:`.events` does not.
"""
