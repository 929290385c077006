"""Evaluators: the exactly scored shapes benchmark (``shapes``)."""
