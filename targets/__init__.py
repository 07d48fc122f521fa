"""Deployment targets (local processes, Android over adb). Installed as ``llc.targets``."""
