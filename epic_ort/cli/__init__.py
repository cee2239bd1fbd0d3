"""The `epic-ort` command line."""
