"""Named redaction pattern sets, selectable in the gateway config beside user regexes.

Each set is one regex. A set may add a check on the matched text (`card_number` keeps only
digit runs that pass the Luhn checksum); a candidate that fails it is left as it was.
"""

from __future__ import annotations

from collections.abc import Callable

_EMAIL = r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}"
# International (+ and 8-15 digits) or grouped numbers with separators, e.g. (415) 555-2671,
# 415-555-2671, +44 20 7946 0958; a bare digit run is not a phone number (years, amounts, ids).
_PHONE = (r"(?<![\w+])(?:\+\d{8,15}|(?:\+\d{1,3}[ .-]?)?(?:\(\d{1,4}\)[ .-]?|\d{2,4}[ .-])"
          r"\d{2,4}[ .-]?\d{3,4})(?!\w)")
# 13-19 digits, optionally grouped by single spaces or dashes (Luhn-checked below).
_CARD = r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d])"
_API_KEY = "|".join([
    r"\bsk-(?:[A-Za-z0-9]+-)*[A-Za-z0-9_]{20,}",  # OpenAI sk-..., sk-proj-..., Anthropic sk-ant-...
    r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b",  # AWS access key ids
    r"\bgh[pousr]_[A-Za-z0-9]{36,}",  # GitHub tokens
    r"\bgithub_pat_[A-Za-z0-9_]{22,}",
    r"\bxox[abposr]-[A-Za-z0-9-]{10,}",  # Slack
    r"\bAIza[0-9A-Za-z_-]{35}",  # Google API keys
])
_BEARER = r"\b[Bb]earer[ \t]+[A-Za-z0-9._~+/-]{8,}=*"

NAMED_PATTERNS: dict[str, str] = {
    "email": _EMAIL,
    "phone": _PHONE,
    "card_number": _CARD,
    "api_key": _API_KEY,
    "bearer_token": _BEARER,
}
"""Name -> regex of every pattern set `redaction.named_patterns` may select."""


def luhn_valid(text: str) -> bool:
    """True when the digits of `text` pass the Luhn checksum (what every card number does)."""
    digits = [int(c) for c in text if c.isdigit()]
    total = 0
    for position, digit in enumerate(reversed(digits)):
        if position % 2 == 1:
            digit = digit * 2 - 9 if digit > 4 else digit * 2
        total += digit
    return total % 10 == 0


CHECKS: dict[str, Callable[[str], bool]] = {"card_number": luhn_valid}
"""Extra test a match of the named set must pass to be redacted."""


def unknown_names(names: list[str]) -> list[str]:
    return [name for name in names if name not in NAMED_PATTERNS]
