"""The HTTP room: the FastAPI app, its routers, request schemas, errors, auth and metrics."""
