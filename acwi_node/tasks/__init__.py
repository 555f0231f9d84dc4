"""The Celery side: the app, the analyse task, enqueueing and the reconciler."""
