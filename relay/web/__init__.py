"""The web dashboard: the pages and assets (``pages``; plain files beside it)
and the live status stream they follow (``live``)."""
