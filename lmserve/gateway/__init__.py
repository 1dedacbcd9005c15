"""The gateway (`lmserve gateway`): routing, auth, limits, health, retries, cache and metrics in
front of any OpenAI-compatible backend. Imports nothing from `lmserve.engine` or `lmserve.server`
(and never torch): it only speaks HTTP.

Modules, outside in:
  serve.py        uvicorn (uvloop + httptools) with SIGTERM drain; TLS
  app.py          the raw ASGI app: owns every component, lifespan, /health /ready /metrics
  handler.py      the /v1 hot path: auth -> validation -> limits -> shedding -> cache -> forward -> accounting
  proxy.py        attempts, retries (before the first byte, within a budget), fallbacks, relaying
  upstream.py     pooled keep-alive HTTP/1.1 client on httptools (connect / first-byte timeouts)
  router.py       names, aliases, canaries, fallback chains, backend choice, load shedding, retry budget
  routing/        one file per strategy behind `RoutingStrategy`
  backends.py     per-backend state; breaker.py the circuit breaker; health.py the active probes
  auth.py         API keys (cached hashes) and JWT; keystore.py keys and the ledger in SQL
  ratelimit.py    RPM/TPM/budgets in process; redis_ratelimit.py the same in Redis (atomic Lua),
                  over local_limits.py (this replica's own counts: the floor when Redis fails)
  cache.py        exact-match response cache; redact.py and sse.py stream rewriting
  ledger.py       batched usage writes; metrics.py Prometheus; logs.py JSON logs; tracing.py OTel
  admin.py        /admin/* ; config.py every setting; cli.py the typer commands
"""
