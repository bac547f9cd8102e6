"""Child processes that do not outlive the program that started them.

A server started in its own session (so a Ctrl-C meant for its parent does not cut it off mid-request)
is also out of reach of the signals that end its parent: if the parent is killed outright, the child
keeps running and keeps its ports. On Linux the kernel can send the child a signal when its parent
exits (``prctl(PR_SET_PDEATHSIG)``); elsewhere these helpers do nothing, and an orderly stop is all
there is.
"""

from __future__ import annotations

import ctypes
import functools
import os
import signal
import sys
from typing import Callable

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
# Loaded before any fork: a preexec_fn should do as little as possible between fork and exec.
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def die_with_parent(parent_pid: int, sig: int = signal.SIGTERM) -> None:
    """Have the kernel send ``sig`` to this process when ``parent_pid``, its parent, exits.

    The request is tied to the parent *thread* that forked: start such children from a thread that
    lives as long as they should (the main thread). If the parent is already gone by the time this
    runs, the signal is sent at once.
    """
    if _LIBC is None:
        return
    if _LIBC.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"prctl(PR_SET_PDEATHSIG) failed: {os.strerror(errno)}")
    if os.getppid() != parent_pid:  # the parent exited between fork and prctl
        os.kill(os.getpid(), sig)


def dies_with_this_process(sig: int = signal.SIGTERM) -> Callable[[], None]:
    """A ``preexec_fn`` for ``subprocess.Popen``: the child gets ``sig`` when this process exits."""
    return functools.partial(die_with_parent, os.getpid(), sig)
