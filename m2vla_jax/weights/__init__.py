"""Importers that turn released checkpoints into our parameter trees, validating every key."""
