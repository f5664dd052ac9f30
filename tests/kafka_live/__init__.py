"""Live schemas on Kafka: billing's worker modules and the shop's classes.

The event topic is ``KAFKA_LIVE_TOPIC`` (read at import: each test runs its
workers and CLI calls with a topic of its own; the test process itself publishes
with ``topic=``).
"""
