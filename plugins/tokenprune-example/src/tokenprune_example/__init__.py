"""Example tokenprune plugin (see README)."""
