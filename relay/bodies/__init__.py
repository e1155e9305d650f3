"""Request and response bodies of the HTTP API (pydantic), one module per dialect.

``openai`` (chat completions, images, transcriptions, model lists, the error
body every door but SwiftChat's answers with), ``instances`` (the relay's own
API: registration, owner actions, caller keys, views, health), ``swiftchat``
(Converse, images, models, its errors, the upgrade check) and ``dify`` (the
Dify chat-app API).  Models that only describe an answer for the OpenAPI
document sit with their dialect.
"""
