"""Maintainers' tools: python -m tools.bench (make bench)."""
