"""Modules of a small deployment: a web app that holds only the event classes, and
three versions of a handler service (a rolling deploy), plus a second service."""
