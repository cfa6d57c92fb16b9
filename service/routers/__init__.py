"""The HTTP API, one router module per resource (docs/design.md)."""
