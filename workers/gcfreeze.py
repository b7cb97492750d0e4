"""Keep a detection worker's long-lived objects out of Python's full garbage collections.

A worker holds ~300k objects that live as long as it does (modules, Celery, SQLAlchemy, the model). Each
full (generation 2) collection walked all of them: ~100 ms with the GIL held, 0.86-1.0 s of CPU per worker
over the ~15,000 images each worker scored in a shortened fleet benchmark (~0.06 ms per image).
``gc.freeze()`` moves every object alive at that moment into a permanent generation that collections skip;
objects freed by reference counting are still freed at once. Frozen objects in a reference cycle are only
reclaimed after ``gc.unfreeze()``, so each freeze first unfreezes and collects: what a model switch left
behind goes then (or, if a batch still held it at that moment, at the next switch).
"""

from __future__ import annotations

import gc
import threading

_lock = threading.Lock()


def freeze_long_lived() -> int:
    """Unfreeze, collect everything, then freeze what is alive now; returns how many objects are frozen."""
    with _lock:
        gc.unfreeze()
        gc.collect()
        gc.freeze()
        return gc.get_freeze_count()
