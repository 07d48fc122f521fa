"""llc: compile a decoder LLM into per-device bundles and run it across phones."""

__version__ = "0.1.0"
