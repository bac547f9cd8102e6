"""Crops to Triton through system shared memory, when the gateway and Triton share a host.

Each slot is a pair of POSIX shared-memory regions (``/dev/shm``) registered with Triton: the gateway
writes a batch of crops into the input region, the request names the regions instead of carrying the
pixels, and Triton writes the embeddings into the output region. A call takes a free slot or, when
every slot is busy, goes over gRPC as usual: shared memory never makes a request wait.

Triton forgets registrations when it restarts: a call that fails because its region is unknown marks
the slots unregistered, and the next call registers them again.
"""

from __future__ import annotations

import logging
import os
import secrets
from dataclasses import dataclass
from typing import Any

import numpy as np

from cdface.core.contract import INPUT_SIZE

log = logging.getLogger("cdface.serving.shared_memory")


@dataclass(eq=False)
class Slot:
    """One call's pair of regions: the crops go in through ``input_name``, the embeddings come back in
    ``output_name``; ``release`` hands the pair back to its pool."""

    pool: "SharedMemorySlots"
    input_name: str
    output_name: str
    input_handle: Any
    output_handle: Any

    def write(self, crops: np.ndarray) -> None:
        import tritonclient.utils.shared_memory as shm

        shm.set_shared_memory_region(self.input_handle, [crops])

    def read(self, rows: int) -> np.ndarray:
        import tritonclient.utils.shared_memory as shm

        # A copy: the region is written again by the slot's next call.
        return np.array(shm.get_contents_as_numpy(self.output_handle, np.float32, (rows, self.pool.dim)))

    def release(self) -> None:
        self.pool._free.append(self)


class SharedMemorySlots:
    """``slots`` input/output region pairs sized for ``max_batch`` crops and ``dim``-d float32 embeddings."""

    def __init__(self, slots: int, max_batch: int, dim: int) -> None:
        import tritonclient.utils.shared_memory as shm

        self.input_bytes = max_batch * INPUT_SIZE * INPUT_SIZE * 3
        self.output_bytes = max_batch * dim * 4
        self.dim = dim
        token = f"cdface-{os.getpid()}-{secrets.token_hex(4)}"
        self._all = []
        for i in range(slots):
            names = (f"{token}-{i}-in", f"{token}-{i}-out")
            self._all.append(Slot(self, names[0], names[1],
                                  shm.create_shared_memory_region(names[0], f"/{names[0]}", self.input_bytes),
                                  shm.create_shared_memory_region(names[1], f"/{names[1]}", self.output_bytes)))
        self._free = list(self._all)
        self.registered = False

    async def register(self, client: Any) -> None:
        """Register every region with Triton (raises what the client raises when Triton refuses)."""
        for slot in self._all:
            for name, size in ((slot.input_name, self.input_bytes), (slot.output_name, self.output_bytes)):
                # A registration left by an attempt cut short would refuse this one: clear it first.
                await client.unregister_system_shared_memory(name)
                await client.register_system_shared_memory(name, f"/{name}", size)
        self.registered = True

    def take(self) -> Slot | None:
        return self._free.pop() if self._free else None

    async def close(self, client: Any | None) -> None:
        import tritonclient.utils.shared_memory as shm

        if client is not None and self.registered:
            for slot in self._all:
                for name in (slot.input_name, slot.output_name):
                    try:
                        await client.unregister_system_shared_memory(name)
                    except Exception as exc:  # Triton gone: its registrations went with it
                        log.debug("unregistering %s: %s", name, type(exc).__name__)
        self.registered = False
        for slot in self._all:
            for handle in (slot.input_handle, slot.output_handle):
                shm.destroy_shared_memory_region(handle)
        self._all, self._free = [], []
