"""The HTTP side: the JSON API (studies, worklist) and health endpoints."""
