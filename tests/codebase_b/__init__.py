"""Codebase B (billing): handles ``OrderPlaced`` with its own copy of the class.

Only worker processes import it; the test process never does, so the two copies
of the class never meet in one process (as in two deployed services)."""
