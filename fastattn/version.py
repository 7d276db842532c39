"""The package version: one place, read by pyproject.toml, fastattn.__version__ and the reports."""
__version__ = "0.1.0"
