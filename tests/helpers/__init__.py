"""Test-only helpers (fixtures that several test modules share)."""
