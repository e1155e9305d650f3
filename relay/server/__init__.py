"""The process: ``relay serve`` and ``relay demo`` (``cli``, ``demo``) and the
HTTP edge they run the app on (``edge``: uvicorn, bounded headers, the drain)."""
