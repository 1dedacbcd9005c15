"""Models served in ways other than a fixed pool: ensembles (ensemble.py) and models the gateway
loads on demand (launcher.py). Their settings only; kept apart from config.py, which imports them."""

from __future__ import annotations

from dataclasses import dataclass, field

ENSEMBLE_RULES = ("first", "logprob")


@dataclass
class EnsembleConfig:
    """A model name that fans each request out to several models and answers with one of them."""

    name: str
    """The `model` value clients send; must not be a model, alias or canary name."""
    members: list[str] = field(default_factory=list)
    """Two or more configured models (or aliases); each gets the whole request."""
    rule: str = "first"
    """first: the first complete answer wins and the others are cancelled at once (hedging);
    logprob: every member answers and the highest mean token log-probability wins."""

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("every ensemble needs a non-empty name")
        if self.rule not in ENSEMBLE_RULES:
            raise ValueError(f"ensemble {self.name!r}: rule must be one of {ENSEMBLE_RULES}, got {self.rule!r}")
        if len(set(self.members)) < 2 or len(set(self.members)) != len(self.members):
            raise ValueError(f"ensemble {self.name!r}: members must name two or more different models, "
                             f"got {self.members!r}")


@dataclass
class LaunchConfig:
    """How the gateway starts a model's server on demand (llama-swap's and Ollama's way, behind keys and limits)."""

    command: list[str] = field(default_factory=list)
    """The server's argv; `{port}` is replaced by a free port the gateway picks (it serves on 127.0.0.1)."""
    env: dict[str, str] = field(default_factory=dict)
    """Environment variables added for the server."""
    api_key: str | None = None
    """Bearer token the gateway sends to the server."""
    memory: float = 1.0
    """GiB the model takes once loaded, counted against `launch_memory_budget`."""
    idle_unload: float = 300.0
    """Seconds without requests before the server is stopped; 0: never (until evicted)."""
    load_timeout: float = 600.0
    """Longest a request is held while the model loads (and room is made for it); then 503."""
    log_file: str | None = None
    """Where the server's output goes (appended); default: discarded."""

    def __post_init__(self) -> None:
        if not self.command or not any("{port}" in arg for arg in self.command):
            raise ValueError(f"launch.command must be a non-empty argv with a {{port}} placeholder, got {self.command!r}")
        for name in ("memory", "load_timeout"):
            if getattr(self, name) <= 0:
                raise ValueError(f"launch.{name} must be > 0, got {getattr(self, name)}")
        if self.idle_unload < 0:
            raise ValueError(f"launch.idle_unload must be >= 0, got {self.idle_unload}")
