"""Core: schedule arithmetic, atomic files and folders, YAML, validation. Imports nothing else of stepdistill."""
