"""The `tokenprune` command line."""
