"""The HTTP API: the FastAPI app factory, routes, schemas and dependencies."""
