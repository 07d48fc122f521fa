"""Compiler passes, one per file. Installed as ``llc.passes``."""
