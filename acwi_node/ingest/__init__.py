"""Ingest: the storage SCP, the spool it writes to, and study completion."""
