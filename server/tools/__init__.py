"""Tool calling on the chat API: parsers per model family and the request side."""
