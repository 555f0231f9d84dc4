"""Routing rules as data: which model pipelines a completed study goes to."""
