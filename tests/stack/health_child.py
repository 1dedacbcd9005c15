"""A tiny supervised child for the health-watch tests (run as its own process).

    python -m tests.stack.health_child --port 9001 --state-dir DIR [--startup-delay 2]

GET /ready answers 503 during --startup-delay, then 200. GET /health answers 200, except:
the file DIR/bad exists -> 503; DIR/hang exists -> no answer (and SIGTERM is ignored, like a
wedged process); during the startup delay it hangs too (a slow start). A fresh process deletes both
files, like a restart that fixes what was wrong. It writes its pid to DIR/pid once listening.
"""

from __future__ import annotations

import argparse
import os
import signal
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--state-dir", type=Path, required=True)
    parser.add_argument("--startup-delay", type=float, default=0.0)
    args = parser.parse_args()
    state: Path = args.state_dir
    for name in ("bad", "hang"):
        (state / name).unlink(missing_ok=True)
    ready_at = time.monotonic() + args.startup_delay

    def on_sigterm(*_: object) -> None:
        if not (state / "hang").exists():  # a wedged process ignores it
            os._exit(0)

    signal.signal(signal.SIGTERM, on_sigterm)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            starting = time.monotonic() < ready_at
            if self.path == "/ready":
                self._answer(503 if starting else 200)
            elif self.path == "/health":
                if starting or (state / "hang").exists():
                    time.sleep(3600)
                self._answer(503 if (state / "bad").exists() else 200)
            else:
                self._answer(404)

        def _answer(self, status: int) -> None:
            self.send_response(status)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *_: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    server.daemon_threads = True
    (state / "pid").write_text(str(os.getpid()))
    server.serve_forever()


if __name__ == "__main__":
    main()
