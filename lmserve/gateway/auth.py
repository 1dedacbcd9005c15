"""Who is calling: API keys (hashed, cached in memory) and JWT bearer tokens.

Hot-path cost: a dict lookup for a cached key or token. A key is re-read from the database at most
every `key_cache_ttl` seconds (so a revocation made elsewhere, e.g. by `lmserve keys revoke` or
another replica's admin API, takes effect within that time; one made through this gateway's admin
API takes effect at once). Concurrent misses for one key share one database read.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt

from lmserve.gateway.config import JWTConfig
from lmserve.gateway.errors import GatewayError, unauthorized
from lmserve.gateway.identity import tenant_header_value
from lmserve.gateway.keystore import KeyRecord, KeyStore, hash_key

_NEGATIVE_TTL = 1.0
_JWT_CACHE_MAX = 50_000


@dataclass(frozen=True)
class Principal:
    """The authenticated caller. `models` None means every model; limits None means unlimited."""

    id: str
    """Stable id used for limits and the ledger: a key id, or `jwt:<sub>`."""
    name: str
    tenant: str | None
    models: frozenset[str] | None
    rpm: int | None
    tpm: int | None
    budget_tokens: int | None
    priority: str = "normal"
    tenant_header: bytes = field(init=False, repr=False, compare=False)
    """The `X-Lmserve-Tenant` value sent to backends: the tenant, else the key's own id (a key
    without a tenant is a tenant of its own). Set at construction: a plain attribute is read faster
    on the hot path than a cached_property (which the interpreter cannot specialise)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "tenant_header", tenant_header_value(self.tenant or self.id))

    def may_use(self, model: str) -> bool:
        return self.models is None or model in self.models


ANONYMOUS = Principal("anonymous", "anonymous", None, None, None, None, None)


def _from_key(record: KeyRecord, defaults: tuple[int | None, int | None]) -> Principal:
    rpm = record.rpm if record.rpm is not None else defaults[0]
    tpm = record.tpm if record.tpm is not None else defaults[1]
    return Principal(record.id, record.name, record.tenant, record.models, rpm, tpm, record.budget_tokens,
                     record.priority)


class KeyRefused(GatewayError):
    """A 401 for a key the store knows (revoked or expired); `principal` names it for the per-key metrics."""

    def __init__(self, message: str, principal: Principal, reason: str) -> None:
        super().__init__(401, message, "authentication_error", "invalid_api_key")
        self.principal = principal
        self.reason = reason


_Entry = tuple[Principal | None, str, float | None, float]


def _entry(record: KeyRecord | None, key_hash: str, keys: dict[str, tuple[KeyRecord | None, float]],
           defaults: tuple[int | None, int | None]) -> _Entry:
    """The hot-path cache entry for a looked-up key: (principal or None, refusal message, expiry
    epoch, re-read after); valid as long as the record's cache entry. A revoked key keeps its
    principal (with a refusal) so that its refusals can be counted per key."""
    valid_until = keys[key_hash][1] if key_hash in keys else time.monotonic()
    if record is None:
        return None, "Invalid or missing API key.", None, valid_until
    if record.revoked_at is not None:
        return _from_key(record, defaults), "This API key has been revoked.", None, valid_until
    expires_at = record.expires_at.timestamp() if record.expires_at is not None else None
    return _from_key(record, defaults), "", expires_at, valid_until


class JWTVerifier:
    """Checks signature, exp/nbf, iss and aud; maps claims to a Principal."""

    def __init__(self, config: JWTConfig) -> None:
        self.config = config
        self.keys: dict[str, Any] = {}
        if config.jwks_file:
            jwks = json.loads(Path(config.jwks_file).read_text())
            for jwk in jwks.get("keys", []):
                self.keys[jwk.get("kid", "")] = jwt.PyJWK(jwk).key
            if not self.keys:
                raise ValueError(f"{config.jwks_file}: no keys in the JWKS")

    def verify(self, token: str) -> tuple[Principal, float]:
        """Returns the principal and the token's expiry (epoch seconds, inf when none)."""
        cfg = self.config
        try:
            header = jwt.get_unverified_header(token)
            alg = header.get("alg")
            if alg == "HS256" and cfg.secret:
                key: Any = cfg.secret
            elif alg == "RS256" and self.keys:
                kid = header.get("kid", "")
                if kid not in self.keys and len(self.keys) != 1:
                    raise unauthorized("JWT signed with an unknown key id.")
                key = self.keys.get(kid) or next(iter(self.keys.values()))
            else:
                raise unauthorized(f"JWT algorithm {alg!r} is not accepted.")
            claims = jwt.decode(token, key, algorithms=[alg], audience=cfg.audience, issuer=cfg.issuer,
                                leeway=cfg.leeway, options={"require": ["exp"]})
        except jwt.ExpiredSignatureError:
            raise unauthorized("JWT has expired.") from None
        except jwt.InvalidAudienceError:
            raise unauthorized("JWT audience is not accepted.") from None
        except jwt.InvalidIssuerError:
            raise unauthorized("JWT issuer is not accepted.") from None
        except jwt.PyJWTError as exc:
            raise unauthorized(f"Invalid JWT: {exc}.") from None
        sub = _str_claim(claims, "sub") or "unknown"
        models = claims.get(cfg.models_claim)
        if models is not None and not (isinstance(models, list) and all(isinstance(m, str) for m in models)):
            # A string here would otherwise mean "no restriction": refuse rather than widen access.
            raise unauthorized(f"JWT claim {cfg.models_claim!r} must be a list of model names.")
        principal = Principal(
            id=f"jwt:{sub}", name=sub, tenant=_str_claim(claims, cfg.tenant_claim) or sub,
            models=frozenset(models) if models is not None else None,
            rpm=_int_claim(claims, "rpm"), tpm=_int_claim(claims, "tpm"),
            budget_tokens=_int_claim(claims, "budget_tokens"),
            priority=claims.get("priority", "normal") if claims.get("priority") in ("high", "low") else "normal",
        )
        return principal, float(claims["exp"])


def _str_claim(claims: dict[str, Any], name: str) -> str | None:
    """A claim that must be a string when present: anything else is the token's fault (401)."""
    value = claims.get(name)
    if value is None or isinstance(value, str):
        return value
    raise unauthorized(f"JWT claim {name!r} must be a string.")


def _int_claim(claims: dict[str, Any], name: str) -> int | None:
    value = claims.get(name)
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


class Authenticator:
    """Turns an `Authorization` header into a Principal or raises a 401/403 GatewayError."""

    def __init__(self, store: KeyStore, key_cache_ttl: float, jwt_config: JWTConfig | None,
                 auth_required: bool = True, default_limits: tuple[int | None, int | None] = (None, None)) -> None:
        self.store = store
        self.default_limits = default_limits
        """(rpm, tpm) for keys and tokens that carry none."""
        self.ttl = key_cache_ttl
        self.jwt = JWTVerifier(jwt_config) if jwt_config else None
        self.auth_required = auth_required
        self._keys: dict[str, tuple[KeyRecord | None, float]] = {}
        self._pending: dict[str, asyncio.Future[KeyRecord | None]] = {}
        self._tokens: dict[str, tuple[Principal, float]] = {}
        # The hot path reads only this (see `_entry`).
        self._principals: dict[str, _Entry] = {}

    async def authenticate(self, authorization: bytes | None) -> Principal:
        if not authorization:
            if not self.auth_required:
                return ANONYMOUS
            raise unauthorized("Missing API key: send `Authorization: Bearer <key>`.")
        if not authorization[:7].lower() == b"bearer ":
            raise unauthorized("Authorization must be a Bearer token.")
        token = authorization[7:].strip().decode("latin-1")
        if self.jwt is not None and token.count(".") == 2 and token.startswith("eyJ"):
            return self._verify_jwt(token)
        key_hash = hash_key(token)
        now = time.time()
        cached = self._principals.get(key_hash)
        if cached is None or time.monotonic() >= cached[3]:
            cached = _entry(await self._lookup(key_hash), key_hash, self._keys, self.default_limits)
            self._principals[key_hash] = cached
        principal, refusal, expires_at, _ = cached
        if principal is None:
            raise unauthorized(refusal)
        if refusal:
            raise KeyRefused(refusal, principal, "revoked")
        if expires_at is not None and now >= expires_at:
            raise KeyRefused("This API key has expired.", principal, "expired")
        return principal

    def _verify_jwt(self, token: str) -> Principal:
        now = time.time()
        cached = self._tokens.get(token)
        if cached is not None and now < cached[1]:
            return cached[0]
        principal, exp = self.jwt.verify(token)  # type: ignore[union-attr]
        if principal.rpm is None or principal.tpm is None:
            principal = dataclasses.replace(
                principal, rpm=principal.rpm if principal.rpm is not None else self.default_limits[0],
                tpm=principal.tpm if principal.tpm is not None else self.default_limits[1])
        if len(self._tokens) >= _JWT_CACHE_MAX:
            self._tokens.clear()
        self._tokens[token] = (principal, exp)
        return principal

    async def _lookup(self, key_hash: str) -> KeyRecord | None:
        now = time.monotonic()
        cached = self._keys.get(key_hash)
        if cached is not None and now < cached[1]:
            return cached[0]
        pending = self._pending.get(key_hash)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[KeyRecord | None] = asyncio.get_running_loop().create_future()
        self._pending[key_hash] = future
        try:
            record = await asyncio.to_thread(self.store.find_by_hash, key_hash)
        except Exception as exc:
            future.set_exception(exc)
            future.exception()  # mark retrieved: waiters re-raise it themselves
            raise GatewayError(503, "Key store unavailable.", "service_unavailable", "key_store_error") from exc
        finally:
            self._pending.pop(key_hash, None)
        future.set_result(record)
        ttl = self.ttl if record is not None else min(self.ttl, _NEGATIVE_TTL)
        self._keys[key_hash] = (record, time.monotonic() + ttl)
        return record

    def forget(self, key_id: str) -> None:
        """Drops a key from the cache at once (after an admin revoke on this gateway)."""
        for key_hash, (record, _) in list(self._keys.items()):
            if record is not None and record.id == key_id:
                del self._keys[key_hash]
                self._principals.pop(key_hash, None)

