"""Errors of the Open Inference Protocol: one exception, two spellings. Over HTTP it is a
status with ``{"error": "..."}``; over gRPC a status code with the same message."""
from __future__ import annotations

# name -> (HTTP status, grpc.StatusCode name)
_KINDS = {
    "invalid": (400, "INVALID_ARGUMENT"),
    "unauthenticated": (401, "UNAUTHENTICATED"),
    "not_found": (404, "NOT_FOUND"),
    "too_large": (413, "INVALID_ARGUMENT"),
    "cancelled": (499, "CANCELLED"),
    "internal": (500, "INTERNAL"),
    "unimplemented": (501, "UNIMPLEMENTED"),
    "unavailable": (503, "UNAVAILABLE"),
    "deadline": (504, "DEADLINE_EXCEEDED"),
}
_BY_STATUS = {status: kind for kind, (status, _) in _KINDS.items()}


class V2Error(Exception):
    def __init__(self, kind: str, message: str, headers: dict | None = None,
                 status: int | None = None) -> None:
        super().__init__(message)
        self.kind, self.message, self.headers = kind, message, headers or {}
        self.http_status = status or _KINDS[kind][0]

    @property
    def grpc_code(self) -> str:
        return _KINDS[self.kind][1]

    def body(self) -> dict:
        return {"error": self.message}

    @classmethod
    def bad(cls, message: str) -> "V2Error":
        return cls("invalid", message)

    @classmethod
    def from_status(cls, status: int, message: str, headers: dict | None = None) -> "V2Error":
        """From an HTTP status (the OpenAI front end's errors, shared guards)."""
        kind = _BY_STATUS.get(status, "invalid" if 400 <= status < 500 else "internal")
        return cls(kind, message, headers, status)
