"""The build directory: one schema module for its documents (schema.py)."""
