"""The doors: one module per dialect a caller speaks.

A door reads its dialect's request, names the instance (from the path, the
body's ``model`` or the caller key), runs an operation through the path
every door shares (:mod:`relay.serving`), and shapes the answer and its
errors the way its own clients expect.  A new dialect is a new module here,
plus its rows in :mod:`relay.routes`.
"""
