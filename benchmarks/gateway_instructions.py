"""Instructions per proxied request in the gateway's Python path, counted by valgrind (cachegrind).

    python benchmarks/gateway_instructions.py          # needs valgrind (apt-get install valgrind)

Why instructions and not seconds: on this VM the CPU's speed drifts by tens of percent from minute to
minute (other tenants), so two timed runs a few minutes apart cannot tell a 5% change from noise.
The count of user-space instructions is the same from run to run (within ~0.5%), so it shows what a
change to the hot path does. It leaves out the kernel (socket syscalls), which only the timed
benchmark (gateway_overhead.py) sees.

What runs: the mock upstream (benchmarks/mock_upstream.py) in its own process, and in this one under
cachegrind, 64 concurrent workers that call an ASGI app directly (no client socket, no HTTP server
protocol) for a fixed number of requests. Two runs with different counts; the difference divided by
the difference in requests is the cost of one request, start-up excluded. Apps:
- `bare`: read the body, forward it with UpstreamPool, send the answer back (the floor);
- `gateway`: the lmserve gateway with an API key and RPM/TPM limits on, as in gateway_overhead.py.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

BODY = b'{"model":"mock","messages":[{"role":"user","content":"Say hello."}],"max_tokens":8}'
WORKERS = 64


async def _drive(kind: str, upstream: str, db: str, key: str, per_worker: int) -> None:
    from lmserve.gateway.app import create_app
    from lmserve.gateway.config import config_from_dict
    from lmserve.gateway.upstream import UpstreamPool

    if kind == "bare":
        pool = UpstreamPool()

        async def app(scope, receive, send):  # type: ignore[no-untyped-def]
            message = await receive()
            response = await pool.request(upstream, b"POST", scope["path"].encode(),
                                          [(b"content-type", b"application/json")], message["body"], 5, 30)
            data = await response.read()
            response.release()
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(data))]})
            await send({"type": "http.response.body", "body": data})
    else:
        app = create_app(config_from_dict({"models": [{"name": "mock", "backends": [{"url": upstream}]}],
                                           "database_url": db, "access_log": False, "log_level": "warning",
                                           "health": {"probe_interval": 60}}))
        await app.startup()
    headers = [(b"host", b"gateway"), (b"content-type", b"application/json"),
               (b"authorization", b"Bearer " + key.encode()), (b"content-length", b"%d" % len(BODY))]

    async def one() -> None:
        scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": headers,
                 "query_string": b""}
        statuses = []

        async def receive():  # type: ignore[no-untyped-def]
            return {"type": "http.request", "body": BODY, "more_body": False}

        async def send(message):  # type: ignore[no-untyped-def]
            if message["type"] == "http.response.start":
                statuses.append(message["status"])

        await app(scope, receive, send)
        if statuses != [200]:
            raise SystemExit(f"{kind}: answered {statuses}")

    async def worker() -> None:
        for _ in range(per_worker):
            await one()

    await asyncio.gather(*(worker() for _ in range(WORKERS)))
    if kind != "bare":
        await app.shutdown()


def _instructions(kind: str, upstream: str, db: str, key: str, per_worker: int) -> int:
    out = subprocess.run(["valgrind", "--tool=cachegrind", "--cache-sim=no", "--cachegrind-out-file=/dev/null",
                          sys.executable, __file__, "--drive", kind, upstream, db, key, str(per_worker)],
                         capture_output=True, text=True, check=True)
    match = re.search(r"I\s+refs:\s+([\d,]+)", out.stderr)
    if match is None:
        raise SystemExit(f"no instruction count from valgrind:\n{out.stderr[-2000:]}")
    return int(match.group(1).replace(",", ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--few", type=int, default=10, help="requests per worker in the short run")
    parser.add_argument("--many", type=int, default=40, help="requests per worker in the long run")
    parser.add_argument("--drive", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.drive:
        import uvloop

        kind, upstream, db, key, per_worker = args.drive
        uvloop.run(_drive(kind, upstream, db, key, int(per_worker)))
        return
    if shutil.which("valgrind") is None:
        sys.exit("valgrind is missing: apt-get install valgrind")
    from benchmarks.servers import free_port, wait_http
    from lmserve.gateway.keystore import KeyStore

    tmp = Path(tempfile.mkdtemp(prefix="gw-instr-"))
    db = f"sqlite:///{tmp / 'gateway.db'}"
    key, _ = KeyStore(db).create_key("bench", rpm=10**9, tpm=10**12)
    port = free_port()
    mock = subprocess.Popen([sys.executable, str(REPO / "benchmarks" / "mock_upstream.py"), "--port", str(port)])
    upstream = f"http://127.0.0.1:{port}"
    try:
        wait_http(upstream + "/health")
        for kind in ("bare", "gateway"):
            few = _instructions(kind, upstream, db, key, args.few)
            many = _instructions(kind, upstream, db, key, args.many)
            per_request = (many - few) / (WORKERS * (args.many - args.few))
            print(f"{kind}: {per_request:,.0f} instructions per request", flush=True)
    finally:
        mock.terminate()


if __name__ == "__main__":
    main()
