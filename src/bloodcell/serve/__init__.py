"""The HTTP server: the FastAPI app (``app``), its ASGI middlewares (``middleware``: the upload
limit and the plain /predict parser) and the micro-batcher that feeds the model (``batching``)."""
