"""The gateway's Triton client: async gRPC, one time budget per request, bounded retries, a circuit breaker.

All Triton calls of one request, retries included, share one time budget (``triton_timeout_s``),
which ends no later than the request's own deadline (``cdface.serving.deadline``): a retry is made
only while time remains, so a frozen server costs a request its budget, never budget x attempts.
When Triton is down a request fails in about the time of one connection attempt (never a hang):
``TritonUnavailable`` carries a ``retry_after`` the API turns into ``503`` + ``Retry-After``. After
``breaker_failures`` consecutive failures the breaker opens and requests fail at once, without
touching the network, until ``breaker_reset_s`` has passed; then one probe request goes through
(half-open) and its outcome closes or re-opens the breaker. gRPC's own reconnect back-off is capped
at a second or two so a restarted server is found again quickly, without restarting the gateway.

All faces of one HTTP request go to Triton as one batch (split only at the model's maximum batch).
With ``merge_slots`` > 0, faces of concurrent requests share calls too (``cdface.serving.merging``).

The endpoint is a gRPC target (setting ``triton_url``). ``host:port`` is one server over one connection.
``dns:///name:port`` (every address the name resolves to, e.g. a Kubernetes headless Service) and
``ipv4:a:port,b:port`` / ``ipv6:[a]:port,...`` (a static list) open one sub-channel per address on
the same gRPC channel and spread requests over them with gRPC's ``round_robin`` policy: one call
to the next ready server, so a server that is down is skipped and a retry goes to another.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import re
import time
from typing import Any

import numpy as np

from cdface.core.contract import INPUT_NAME, OUTPUT_NAME
from cdface.serving import deadline
from cdface.serving.errors import ServingError
from cdface.serving.merging import CallMerger
from cdface.serving.shared_memory import SharedMemorySlots, Slot

log = logging.getLogger("cdface.serving.triton")


# gRPC status codes worth a retry: the server is (re)starting, overloaded, or the call timed out.
_RETRYABLE = {"StatusCode.UNAVAILABLE", "StatusCode.DEADLINE_EXCEEDED", "StatusCode.RESOURCE_EXHAUSTED",
              "StatusCode.CANCELLED", "StatusCode.UNKNOWN"}


# An attempt needs at least this much of the time budget to be worth making (a call cannot complete
# in less); the backstop is how long past gRPC's own deadline a call may hang before it is abandoned.
_MIN_ATTEMPT_S = 0.05
_BACKSTOP_S = 0.25
# Triton gives up this long before the request's deadline, so that its 503 (with Retry-After) is
# answered rather than the deadline's bare 504.
_ANSWER_RESERVE_S = 0.25


# Targets that name several servers: gRPC resolves them to a list of addresses, balanced round-robin.
_BALANCED_SCHEMES = ("dns:", "ipv4:", "ipv6:")
_ROUND_ROBIN = json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})
_HOST_PORT = re.compile(r"^(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):(\d{1,5})$")


def balanced_target(target: str) -> bool:
    """Whether ``target`` names several servers (``dns:``, ``ipv4:``, ``ipv6:``): balanced round-robin."""
    return target.lower().startswith(_BALANCED_SCHEMES)


def check_target(target: str) -> str:
    """``target`` stripped if it is a gRPC target this client accepts; ``ValueError`` naming the forms if not.

    ``host:port``; ``dns:///name:port`` (or ``dns:name:port``, ``dns://resolver/name:port``);
    ``ipv4:addr:port[,addr:port...]``; ``ipv6:[addr]:port[,[addr]:port...]``; ``unix:path`` passes
    through. A port is required: gRPC would otherwise pick 443, never Triton's.
    """
    target = target.strip()
    forms = "host:port, dns:///name:port, ipv4:addr:port[,addr:port...] or ipv6:[addr]:port[,[addr]:port...]"
    lower = target.lower()
    if lower.startswith(("unix:", "unix-abstract:")) and len(target) > target.index(":") + 1:
        return target  # a local socket: gRPC's own business
    if lower.startswith("dns:"):
        rest = target[4:]
        if rest.startswith("//"):  # dns://[resolver]/name:port
            _, _, rest = rest[2:].partition("/")
        addresses = [rest]
    elif lower.startswith(("ipv4:", "ipv6:")):
        addresses = target[5:].split(",")
    else:
        addresses = [target]
    for address in addresses:
        match = _HOST_PORT.match(address)
        if not match or not 0 < int(match.group(1)) < 65536:
            raise ValueError(f"{target!r} is not a gRPC target with a port: use {forms}")
        host = address[:match.start(1) - 1]
        if lower.startswith("ipv4:"):
            _ip(host, ipaddress.IPv4Address, target)
        elif lower.startswith("ipv6:"):
            if not (host.startswith("[") and host.endswith("]")):
                raise ValueError(f"{target!r}: write IPv6 addresses in brackets, ipv6:[addr]:port")
            _ip(host[1:-1], ipaddress.IPv6Address, target)
    return target


def _ip(host: str, kind: type, target: str) -> None:
    try:
        kind(host)
    except ValueError:
        raise ValueError(f"{target!r}: {host!r} is not an {kind.__name__[:4]} address") from None


def channel_args(target: str) -> list[tuple[str, Any]]:
    """gRPC channel options for ``target``: message sizes, quick reconnects, no gRPC-level retries (ours
    count for the breaker), and round-robin over the addresses of a target that names several servers."""
    from tritonclient.grpc import MAX_GRPC_MESSAGE_SIZE

    args: list[tuple[str, Any]] = [
        ("grpc.max_send_message_length", MAX_GRPC_MESSAGE_SIZE),
        ("grpc.max_receive_message_length", MAX_GRPC_MESSAGE_SIZE),
        # Find a restarted server within about a second, not gRPC's default two minutes.
        ("grpc.initial_reconnect_backoff_ms", 200),
        ("grpc.min_reconnect_backoff_ms", 200),
        ("grpc.max_reconnect_backoff_ms", 1000),
        ("grpc.enable_retries", 0),
    ]
    if balanced_target(target):
        # round_robin: a sub-channel per address, each call to the next ready one. Our config is the
        # only one: a service config published in DNS (TXT) is not looked up.
        args += [("grpc.service_config", _ROUND_ROBIN), ("grpc.service_config_disable_resolution", 1)]
    return args


class TritonUnavailable(ServingError):
    """Triton cannot answer now; ``retry_after`` seconds is a sensible wait."""

    code = "model_unavailable"

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class TritonRejected(ServingError):
    """Triton answered with an error that retrying will not fix (bad input, unknown model)."""

    code = "model_error"


class CircuitBreaker:
    """closed -> (N consecutive failures) -> open -> (reset_s) -> half-open: one probe -> closed or open."""

    def __init__(self, failures: int, reset_s: float) -> None:
        self.threshold = failures
        self.reset_s = reset_s
        self.failures = 0
        self.opened_at: float | None = None
        self._probing = False

    @property
    def state(self) -> str:
        if self.opened_at is None:
            return "closed"
        return "half-open" if time.monotonic() - self.opened_at >= self.reset_s else "open"

    def before(self) -> None:
        """Raise ``TritonUnavailable`` unless a call may go out now."""
        state = self.state
        if state == "open" and self.opened_at is not None:
            remaining = self.reset_s - (time.monotonic() - self.opened_at)
            raise TritonUnavailable("the model server is unavailable (circuit open)", max(1.0, remaining))
        if state == "half-open" and self._probing:  # one probe at a time
            raise TritonUnavailable("the model server is unavailable (circuit open)", 1.0)
        if state == "half-open":
            self._probing = True

    def success(self) -> None:
        self.failures, self.opened_at, self._probing = 0, None, False

    def failure(self) -> None:
        self.failures += 1
        self._probing = False
        if self.failures >= self.threshold or self.opened_at is not None:
            self.opened_at = time.monotonic()


class TritonEmbedder:
    """Crops in, embeddings out, over Triton's gRPC API."""

    def __init__(self, url: str, model: str, version: int | None, *, dim: int, timeout_s: float = 10.0,
                 retries: int = 2, breaker_failures: int = 3, breaker_reset_s: float = 5.0,
                 max_batch: int = 32, merge_slots: int = 0, shared_memory_slots: int = 0) -> None:
        self.url, self.model = url, model
        self.version = "" if version is None else str(version)
        self.dim = dim
        self.timeout_s = timeout_s
        self.retries = retries
        self.max_batch = max_batch
        self.breaker = CircuitBreaker(breaker_failures, breaker_reset_s)
        self._client = None
        self.merger = CallMerger(self._infer, slots=merge_slots, max_batch=max_batch, timeout_error=_timed_out) \
            if merge_slots else None
        self.shared_memory = SharedMemorySlots(shared_memory_slots, max_batch, dim) if shared_memory_slots else None
        self._register_after = 0.0  # monotonic: when to try registering the shared memory again

    def _get_client(self):
        if self._client is None:
            import tritonclient.grpc.aio as grpcclient

            # tritonclient hands the target to grpc.aio.insecure_channel as it is: dns:/// and ipv4:
            # targets reach gRPC's resolvers, and one channel balances over all their addresses.
            self._client = grpcclient.InferenceServerClient(self.url, channel_args=channel_args(self.url))
        return self._client

    @property
    def breaker_open(self) -> bool:
        """True unless the circuit breaker is closed (open, or half-open: letting one probe through)."""
        return self.breaker.state != "closed"

    async def close(self) -> None:
        if self.shared_memory is not None:
            await self.shared_memory.close(self._client)
            self.shared_memory = None
        if self._client is not None:
            client, self._client = self._client, None
            await client.close()

    async def _shared_memory_slot(self, left: float) -> Slot | None:
        """A registered shared-memory slot for the next call, or None: the call goes over gRPC."""
        slots = self.shared_memory
        if slots is None:
            return None
        if not slots.registered:
            if time.monotonic() < self._register_after:
                return None
            try:
                await asyncio.wait_for(slots.register(self._get_client()), timeout=min(left, 2.0))
            except Exception as exc:  # Triton elsewhere (no shared /dev/shm) or down: gRPC, and retry later
                self._register_after = time.monotonic() + 30.0
                log.warning("Triton shared memory not registered (%s): sending crops over gRPC", _short(exc))
                return None
        return slots.take()

    async def model_ready(self, timeout_s: float = 2.0) -> bool:
        """Whether Triton reports the served model (and version) ready; False when it does not answer.

        On a balanced target the question goes to one ready server (the next, round-robin); servers
        that are down are not picked, so True means at least one server serves the model.
        """
        from tritonclient.utils import InferenceServerException

        try:
            return bool(await self._get_client().is_model_ready(self.model, self.version, client_timeout=timeout_s))
        except (InferenceServerException, asyncio.TimeoutError, OSError):
            return False

    async def embed(self, crops: np.ndarray) -> np.ndarray:
        """uint8 [N, 112, 112, 3] RGB -> float32 [N, D]: one Triton call per ``max_batch`` crops.

        All calls of one ``embed``, retries included, share one time budget: ``timeout_s``, cut short
        by the request's deadline (``cdface.serving.deadline``) when that comes first.
        """
        crops = np.ascontiguousarray(crops, dtype=np.uint8)
        if len(crops) == 0:
            return np.zeros((0, self.dim), np.float32)
        ends_at = time.monotonic() + self.timeout_s
        request_ends_at = deadline.expires_at()
        if request_ends_at is not None:
            ends_at = min(ends_at, request_ends_at - _ANSWER_RESERVE_S)
        infer = self.merger.run if self.merger is not None else self._infer
        parts = [await infer(crops[i:i + self.max_batch], ends_at) for i in range(0, len(crops), self.max_batch)]
        return np.concatenate(parts)

    async def _infer(self, batch: np.ndarray, ends_at: float) -> np.ndarray:
        """One batch through Triton, attempts and retries only while ``ends_at`` (monotonic) has not passed."""
        from tritonclient.grpc import InferInput, InferRequestedOutput
        from tritonclient.utils import InferenceServerException

        last = "no time was left for a call"
        attempts = 0
        for attempt in range(self.retries + 1):
            left = ends_at - time.monotonic()
            if left < _MIN_ATTEMPT_S:
                break
            self.breaker.before()
            tensor = InferInput(INPUT_NAME, list(batch.shape), "UINT8")
            slot = await self._shared_memory_slot(left)
            outputs = None
            if slot is not None:
                slot.write(batch)
                tensor.set_shared_memory(slot.input_name, batch.nbytes)
                output_request = InferRequestedOutput(OUTPUT_NAME)
                output_request.set_shared_memory(slot.output_name, len(batch) * self.dim * 4)
                outputs = [output_request]
            else:
                tensor.set_data_from_numpy(batch)
            attempts += 1
            try:
                # gRPC's own deadline (client_timeout) ends the call with DEADLINE_EXCEEDED; the timeout is
                # the backstop should the client library not honour it, a moment later (asyncio.timeout,
                # unlike wait_for, costs no extra task per call).
                async with asyncio.timeout(left + _BACKSTOP_S):
                    result = await self._get_client().infer(self.model, [tensor], model_version=self.version,
                                                            outputs=outputs, client_timeout=left)
                output = result.as_numpy(OUTPUT_NAME) if slot is None else slot.read(len(batch))
            except (InferenceServerException, asyncio.TimeoutError, OSError) as exc:
                if slot is not None and "shared memory" in str(exc).lower():
                    # Triton restarted and forgot the regions (it answered: it is up): register them
                    # again, and retry at once.
                    self.breaker.success()
                    slot.pool.registered = False
                    last = f"shared memory: {_short(exc)}"
                    continue
                status = exc.status() if isinstance(exc, InferenceServerException) else "StatusCode.DEADLINE_EXCEEDED"
                if status not in _RETRYABLE and not _model_missing(exc):
                    self.breaker.success()  # the server answered: it is up
                    raise TritonRejected(f"the model server refused the request: {_short(exc)}") from None
                self.breaker.failure()
                last = f"{status}: {_short(exc)}"
                backoff = 0.05 * (4 ** attempt)
                if attempt < self.retries and time.monotonic() + backoff + _MIN_ATTEMPT_S < ends_at:
                    await asyncio.sleep(backoff)
                    continue
                break
            finally:
                if slot is not None:
                    slot.release()
            self.breaker.success()
            if output is None or output.shape != (len(batch), self.dim):
                raise TritonRejected(f"the model returned {None if output is None else output.shape}, "
                                     f"expected {(len(batch), self.dim)}")
            return output.astype(np.float32, copy=False)
        log.warning("Triton unavailable after %d attempt(s) within the time budget: %s", attempts, last)
        raise TritonUnavailable("the model server is unavailable", max(1.0, self.breaker.reset_s))


def _timed_out() -> TritonUnavailable:
    return TritonUnavailable("the model server did not answer within the time budget", 1.0)


def _model_missing(exc: Exception) -> bool:
    # A model that is (re)loading is reported as "unavailable"/"not found" with a non-network status.
    text = str(exc).lower()
    return "is not ready" in text or "unavailable" in text or "not found" in text


def _short(exc: Exception) -> str:
    return str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
