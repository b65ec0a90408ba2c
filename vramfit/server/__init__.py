"""OpenAI-compatible HTTP server: protocol (schemas), serving (engine calls, parsing), app (routes)."""
