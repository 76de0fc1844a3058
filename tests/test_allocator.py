"""The server keeps freed host memory for the next batch (allocator.py): checked through glibc's own accounting
(mallinfo2: bytes in mmapped blocks) in a fresh process each time, since the setting is process-wide."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import textwrap

import pytest

from embtrain_server import allocator
from embtrain_server.config import ServerConfig

glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallinfo2 and mallopt are glibc's")

# Runs SETUP, then allocates blocks of 4 and 40 MiB and reports whether glibc served each with its own mmap
# (mallinfo2's hblkhd grew by the block), and the first argument SETUP left in ``said``.
_PROBE = textwrap.dedent("""
    import ctypes, json, sys
    class Info(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in
                    "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
    libc = ctypes.CDLL(None)
    libc.mallinfo2.restype = Info
    said = None
    exec(sys.argv[1])
    mapped = {}
    for mib in (4, 40):
        before = libc.mallinfo2().hblkhd
        block = bytearray(mib << 20)
        mapped[mib] = libc.mallinfo2().hblkhd - before >= mib << 20
        del block
    print(json.dumps({"said": said, "mapped": mapped}))
""")


def _probe(setup: str, env: dict[str, str] | None = None) -> dict:
    out = subprocess.run([sys.executable, "-c", _PROBE, setup], capture_output=True, text=True, timeout=120,
                         env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


_RETAIN = "from embtrain_server import allocator; said = allocator.retain_freed_memory({})"


@glibc
def test_large_blocks_come_from_the_heap_when_retained() -> None:
    base = _probe("")
    assert base["mapped"] == {"4": True, "40": True}  # glibc's defaults: fresh mmap for each
    kept = _probe(_RETAIN.format(1 << 30))
    assert kept["mapped"] == {"4": False, "40": False}
    assert "kept for reuse" in kept["said"] and str(1 << 30) in kept["said"]


@glibc
def test_zero_and_the_environment_leave_glibc_alone() -> None:
    off = _probe(_RETAIN.format(0))
    assert off["mapped"]["40"] and "own thresholds" in off["said"]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(8 << 20)}  # the user's choice: 8 MiB
    chosen = _probe(_RETAIN.format(1 << 30), env)
    assert chosen["mapped"] == {"4": False, "40": True}
    assert "MALLOC_MMAP_THRESHOLD_" in chosen["said"]
    assert "GLIBC_TUNABLES" in allocator.retain_freed_memory(
        1 << 30, {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1"})


@glibc
def test_a_started_server_retains_by_its_config() -> None:
    start = textwrap.dedent("""
        import asyncio
        from embtrain_server.config import ServerConfig
        from embtrain_server.server import start
        async def main():
            srv = await start(ServerConfig(host="127.0.0.1", port=0, metrics_port=0, persist=False, device="cpu",
                                           malloc_retain_bytes={}))
            await srv.stop(0)
        asyncio.run(main())
    """)
    assert not _probe(start.format(1 << 30))["mapped"]["40"]
    assert _probe(start.format(0))["mapped"]["40"]


@pytest.mark.parametrize("bad", [-1, 2**31])
def test_out_of_range_is_refused_naming_the_setting(bad: int) -> None:
    with pytest.raises(ValueError, match=r"malloc_retain_bytes: expected 0\.\.2147483647"):
        ServerConfig(malloc_retain_bytes=bad).validate()
    with pytest.raises(ValueError, match="malloc_retain_bytes"):
        allocator.retain_freed_memory(bad)
