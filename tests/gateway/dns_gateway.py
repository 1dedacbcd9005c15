"""`lmserve gateway` whose DNS discovery reads a test's own hosts file (run as its own process).

    python -m tests.gateway.dns_gateway --config gw.yaml --hosts-file hosts

Only the resolver differs from `lmserve gateway --config gw.yaml`: names are looked up in
`--hosts-file` (the /etc/hosts format, re-read at every resolution) instead of through getaddrinfo.
A test owns that file, so it can change what a name resolves to while the gateway runs, without
root, without touching the machine's /etc/hosts (shared by every test running in parallel, and
left changed if a test dies) and without resolver caches in between.
"""

from __future__ import annotations

import argparse
import ipaddress
import socket
from pathlib import Path

from lmserve.gateway.app import Gateway
from lmserve.gateway.config import load_config
from lmserve.gateway.serve import run_gateway


class HostsFileResolver:
    """Resolves names from a hosts file: `address name [alias...]` per line, `#` starts a comment."""

    def __init__(self, path: Path) -> None:
        self.path = path

    async def resolve(self, host: str, port: int) -> list[str]:
        addresses = set()
        for line in self.path.read_text().splitlines():
            fields = line.split("#", 1)[0].split()
            if len(fields) >= 2 and host in fields[1:]:
                addresses.add(str(ipaddress.ip_address(fields[0])))
        if not addresses:
            raise socket.gaierror(socket.EAI_NONAME, f"{host} is not in {self.path}")
        return sorted(addresses)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("--hosts-file", required=True, type=Path)
    args = parser.parse_args()
    config = load_config(args.config)
    run_gateway(config, Gateway(config, resolver=HostsFileResolver(args.hosts_file)))


if __name__ == "__main__":
    main()
