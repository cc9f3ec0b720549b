"""kvserve server: OpenAI-compatible HTTP front end over the engine."""
