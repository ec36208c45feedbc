"""One module per runtime, each with the same two entry points (see `base.py`).

A runner is imported only inside the worker process that measures it, so a missing runtime
(no torch, no mlx-vlm) fails that worker alone.
"""
