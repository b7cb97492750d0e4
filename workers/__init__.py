"""Celery workers: the app, queue routing, tasks, batching and index replica sync."""
