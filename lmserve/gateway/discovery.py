"""DNS discovery: a backend configured with `discovery: dns` becomes one backend per address.

The configured backend is a template (scheme, port, path, API key, weight); its host name (a
Kubernetes headless Service, say) is resolved every `resolve_interval` seconds off the request path.
Invariant, per template: its pool holds one backend per address of the last successful resolution,
plus backends whose address vanished, which are draining (no new requests) until their in-flight
requests finish and are then removed. A new address gets fresh state (breaker, health, latency); a
failed or empty resolution keeps the last good set, so a DNS outage never empties a pool.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from dataclasses import dataclass, replace
from typing import Protocol
from urllib.parse import urlsplit

from lmserve.gateway.backends import Backend, ModelPool
from lmserve.gateway.config import BackendConfig, HealthConfig
from lmserve.gateway.router import Router

log = logging.getLogger("lmserve.gateway")


class Resolver(Protocol):
    async def resolve(self, host: str, port: int) -> list[str]:
        """The addresses `host` has now (IPv4 or IPv6 text); raises OSError when it cannot say."""
        ...


class SystemResolver:
    """The system's resolver (`getaddrinfo`: /etc/hosts, cluster DNS), run off the event loop."""

    async def resolve(self, host: str, port: int) -> list[str]:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        return sorted({str(info[4][0]) for info in infos})


def address_url(template: str, address: str) -> str:
    """`template` with its host replaced by `address` (bracketed when IPv6), port kept."""
    parts = urlsplit(template)
    host = f"[{address}]" if ipaddress.ip_address(address).version == 6 else address
    return f"{parts.scheme}://{host}:{parts.port or 80}{parts.path}"


@dataclass(eq=False)
class _Target:
    pool: ModelPool
    template: BackendConfig
    host: str
    port: int


class BackendDiscovery:
    """Keeps the pools in step with the addresses of every `discovery: dns` backend."""

    def __init__(self, router: Router, health: HealthConfig, resolver: Resolver, timeout: float = 5.0) -> None:
        self.health = health
        self.resolver = resolver
        self.timeout = timeout
        """Seconds one resolution may take before it counts as failed."""
        self.targets: list[_Target] = []
        for pool in router.pools.values():
            for backend in pool.config.backends:
                if backend.discovery == "dns":
                    parts = urlsplit(backend.url)
                    self.targets.append(_Target(pool, backend, parts.hostname or "", parts.port or 80))
        self._drained: set[Backend] = set()
        """Backends this object drained because their address vanished (an admin drain is left alone)."""
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        """Resolves every target once (so the gateway starts with its pools), then keeps watching."""
        await asyncio.gather(*(self.refresh(t) for t in self.targets))
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._watch(t)) for t in self.targets]

    async def _watch(self, target: _Target) -> None:
        while True:
            await asyncio.sleep(target.template.resolve_interval)
            await self.refresh(target)

    async def refresh(self, target: _Target) -> None:
        """One resolution of `target`, applied to its pool; failures keep the last good set."""
        try:
            addresses = await asyncio.wait_for(self.resolver.resolve(target.host, target.port), self.timeout)
        except (OSError, asyncio.TimeoutError) as exc:
            log.warning("resolving %s failed (%s): keeping its last %d backend(s)", target.template.url,
                        exc or "timed out", len(self._members(target)))
            addresses = None
        if addresses == []:
            log.warning("%s resolved to no address: keeping its last backends", target.template.url)
        if addresses:
            self.apply(target, addresses)
        self._reap(target)

    def _members(self, target: _Target) -> list[Backend]:
        return [b for b in target.pool.backends if b.discovered_from == target.template.url]

    def apply(self, target: _Target, addresses: list[str]) -> None:
        """Adds a backend per new address, drains those whose address vanished, revives returning ones."""
        wanted = {address_url(target.template.url, a) for a in addresses}
        current = {b.url: b for b in self._members(target)}
        added = []
        for url in sorted(wanted - current.keys()):
            backend = Backend.from_config(replace(target.template, url=url, discovery="static"), self.health)
            backend.discovered_from = target.template.url
            added.append(backend)
            log.info("backend %s of %r discovered through %s", url, target.pool.name, target.host)
        for url, backend in current.items():
            if url in wanted and backend in self._drained:
                backend.is_draining = False
                self._drained.discard(backend)
                log.info("backend %s of %r is back in DNS", url, target.pool.name)
            elif url not in wanted and not backend.is_draining:
                backend.is_draining = True
                self._drained.add(backend)
                log.info("backend %s of %r left DNS: draining (%d in flight)", url, target.pool.name,
                         backend.num_outstanding)
        if added:
            # A new list rather than an append: a request iterating the old one is not disturbed.
            target.pool.backends = [*target.pool.backends, *added]

    def _reap(self, target: _Target) -> None:
        done = {b for b in self._members(target) if b in self._drained and b.num_outstanding == 0}
        if done:
            target.pool.backends = [b for b in target.pool.backends if b not in done]
            self._drained -= done
            for backend in done:
                log.info("backend %s of %r drained: removed", backend.url, target.pool.name)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
