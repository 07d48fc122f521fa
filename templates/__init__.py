"""Jinja2 templates for the launcher, run script and report."""
