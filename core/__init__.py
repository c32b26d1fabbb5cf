"""What the API and the workers share, and nothing that needs torch, NumPy or OpenCV.

Settings, logging, the job contract (spec, presets), state and error names, every Redis key,
storage key and RQ task name (``keys``), typed records, stats, fair queueing, shard plans,
the archive store, webhook signing, and the maintenance loop. ``service`` and ``worker``
import from here; this package imports neither.
"""
