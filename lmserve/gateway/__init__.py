"""The gateway: routing, auth, limits, health, retries, cache and metrics in front of any
OpenAI-compatible backend. Imports nothing from `lmserve.engine` or `lmserve.server`."""
