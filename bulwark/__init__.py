"""Bulwark (placeholder; the SDK facade is filled in below)."""
