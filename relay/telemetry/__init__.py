"""What a node says about itself: log format and context, Prometheus metrics,
and the request observer (request ids, access log, the body's pace bounded)."""
