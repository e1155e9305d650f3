"""instance-relay benchmark: what the relay costs, next to a direct connection, in one run.

Run ``python -m bench`` from the repository root (``--quick`` for tiny counts);
``bench/README.md`` explains every figure.
"""
