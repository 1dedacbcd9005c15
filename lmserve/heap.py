"""The Python heap of a long-running process (server, engine process, gateway)."""

from __future__ import annotations

import gc
import logging
import time

logger = logging.getLogger("lmserve.heap")


def freeze_heap(process: str) -> None:
    """Collects, then moves every object alive now out of the collector's sight (`gc.freeze`), so
    that later full collections skip the start-up heap: imported modules, the model's modules, the
    tokenizer, the app. Unfrozen, a full collection walks all of it: about 170 ms in an engine
    process (300k objects), 35 ms in a gateway (60k), a pause of every request in flight there.
    Call once, when start-up is done."""
    start = time.perf_counter()
    gc.collect()
    gc.freeze()
    logger.debug("start-up heap frozen", extra={"fields": {
        "process": process, "objects": gc.get_freeze_count(),
        "collect_ms": round((time.perf_counter() - start) * 1000, 1)}})
