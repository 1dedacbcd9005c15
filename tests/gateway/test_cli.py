import datetime as dt

import pytest
import typer

from lmserve.gateway.cli import _parse_expiry


def test_expiry_forms() -> None:
    now = dt.datetime.now(dt.timezone.utc)
    assert abs((_parse_expiry("30d") - now) - dt.timedelta(days=30)) < dt.timedelta(seconds=5)
    assert abs((_parse_expiry("12h") - now) - dt.timedelta(hours=12)) < dt.timedelta(seconds=5)
    assert _parse_expiry("2030-01-02") == dt.datetime(2030, 1, 2, tzinfo=dt.timezone.utc)
    assert _parse_expiry(None) is None
    with pytest.raises(typer.BadParameter):
        _parse_expiry("soon")
