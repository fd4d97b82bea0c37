"""The OpenAI-style error: an HTTP status and the `{"error": {...}}` body every endpoint returns.

Its own module so that server.py and its helpers (server_requests.py, server_tools.py, ...) raise the
same error without importing each other.
"""

from __future__ import annotations


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
