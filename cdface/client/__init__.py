"""A typed Python client of the cdface gateway's HTTP API, on httpx (``pip install cdface[client]``).

    from cdface.client import Client

    with Client("http://127.0.0.1:8080", api_key="cdf_...") as client:
        person = client.create_identity(external_id="emp-1042", name="Barack Obama")
        client.enroll(person.id, "obama.jpg")
        answer = client.identify("obama2.jpg", top_k=3)
        print(answer.faces[0].match)

``AsyncClient`` has the same methods, awaited. Answers are the models in ``cdface.client.models``;
errors are ``CdfaceAPIError`` subclasses (``cdface.client.errors``) with ``.status``, ``.code`` and
``.message``. The client imports nothing of the server (``cdface.core`` at most), so it installs
with the ``client`` extra alone.
"""

from cdface.client._calls import UNSET, FaceImage, RetryPolicy
from cdface.client.aio import AsyncClient
from cdface.client.errors import (
    AuthenticationError,
    BadRequestError,
    CdfaceAPIError,
    CdfaceClientError,
    CdfaceConnectionError,
    ClientRequestError,
    ConflictError,
    NotFoundError,
    PayloadTooLargeError,
    PermissionDeniedError,
    RateLimitedError,
    ServerError,
    ServiceUnavailableError,
    UnprocessableError,
)
from cdface.client.sync import Client

__all__ = [
    "AsyncClient", "AuthenticationError", "BadRequestError", "CdfaceAPIError", "CdfaceClientError",
    "CdfaceConnectionError", "Client", "ClientRequestError", "ConflictError", "FaceImage", "NotFoundError",
    "PayloadTooLargeError", "PermissionDeniedError", "RateLimitedError", "RetryPolicy", "ServerError",
    "ServiceUnavailableError", "UNSET", "UnprocessableError",
]
