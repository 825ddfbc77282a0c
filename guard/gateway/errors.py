"""The gateway's error: every refusal it answers is in OpenAI's shape, so the SDKs raise their own errors."""

from fastapi import HTTPException


class APIError(HTTPException):
    """An error in OpenAI's shape: {"error": {"message", "type", "code"}}."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None,
                 headers: dict | None = None):
        super().__init__(status_code=status, detail={"message": message, "type": kind, "code": code},
                         headers=headers)
