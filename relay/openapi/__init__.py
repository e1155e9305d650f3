"""The OpenAPI 3.1 document (``GET /openapi.json``), by concern.

``document`` assembles it (schemas from ``relay.bodies``, the paths of the
route table ``relay.routes``, the edge's errors, the websocket and the pages);
``common`` holds what every operation is built with; ``relay_api``, ``openai``,
``transcription``, ``swiftchat`` and ``dify`` the operations of each door family.
"""
