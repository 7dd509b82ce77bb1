"""Contract of the ib_async internals feeds.ibkr.wire patches: the pinned version, the decoder's
handler table entry 17 and its signature, and the same decoding as ib_async's own handler."""
from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import inspect

import ib_async
import pytest
from ib_async import IB, BarData
from ib_async.decoder import Decoder
from ib_async.wrapper import Wrapper

from conftest import pinned_in_setup_cfg
from feeds.ibkr.wire import HISTORICAL_DATA, PINNED_VERSION, WireBar, WireVersionError, check_version, keep_wire_text

UTC = dt.timezone.utc
FIELDS = ["17", "7", "20240705 09:30:00 US/Eastern", "20240705 16:00:00 US/Eastern", "2",
          "1720186200", "226.05", "226.45", "225.88", "226.3", "1834", "226.21", "512",
          "1720186260", "226.3", "226.31", "226.02", "226.1", "902.5", "226.15", "0"]


def decode(patch: bool) -> list[BarData]:
    async def main():
        ib = IB()
        if patch:
            keep_wire_text(ib)
        fut = ib.wrapper.startReq(7, container=[])
        ib.client.decoder.interpret(FIELDS)
        assert fut.done()
        return fut.result()
    return asyncio.run(main())


def test_the_pin_is_setup_cfg_and_installed():
    assert PINNED_VERSION == pinned_in_setup_cfg("ib_async")
    assert ib_async.__version__ == PINNED_VERSION
    check_version()


def test_another_version_is_refused_with_a_clear_error(monkeypatch):
    with pytest.raises(WireVersionError, match=r"ib_async 2\.2\.0 is installed.*ib_async==2\.1\.0"):
        check_version("2.2.0")
    monkeypatch.setattr(ib_async, "__version__", "2.2.0")
    with pytest.raises(WireVersionError):
        keep_wire_text(IB())


def test_handler_table_entry_17_has_the_expected_shape():
    ib = IB()
    decoder = ib.client.decoder
    assert isinstance(decoder, Decoder) and isinstance(decoder.handlers, dict)
    handler = decoder.handlers[HISTORICAL_DATA]
    assert inspect.ismethod(handler) and handler.__self__ is decoder and handler.__name__ == "historicalData"
    assert list(inspect.signature(handler).parameters) == ["fields"]
    assert decoder.wrapper is ib.wrapper
    # what the replacement calls on the wrapper
    assert list(inspect.signature(Wrapper.historicalData).parameters) == ["self", "reqId", "bar"]
    assert list(inspect.signature(Wrapper.historicalDataEnd).parameters)[:2] == ["self", "reqId"]
    assert len(inspect.signature(Wrapper.historicalDataEnd).parameters) == 4
    # the BarData fields the replacement fills, in ib_async's order
    assert [f.name for f in dataclasses.fields(BarData)] == ["date", "open", "high", "low", "close", "volume",
                                                            "average", "barCount"]
    assert [f.name for f in dataclasses.fields(WireBar)][-1] == "text"


def test_the_patch_decodes_as_ib_async_does_and_keeps_the_text():
    plain, patched = decode(False), decode(True)
    assert [type(b) for b in plain] == [BarData, BarData] and [type(b) for b in patched] == [WireBar, WireBar]
    fields = [f.name for f in dataclasses.fields(BarData)]
    assert [[getattr(b, f) for f in fields] for b in patched] == [[getattr(b, f) for f in fields] for b in plain]
    assert patched[0].date == dt.datetime(2024, 7, 5, 13, 30, tzinfo=UTC)
    assert patched[0].text == ("226.05", "226.45", "225.88", "226.3", "1834", "226.21")
    assert patched[1].text == ("226.3", "226.31", "226.02", "226.1", "902.5", "226.15")


def test_idempotent_and_refuses_a_changed_decoder():
    ib = IB()
    keep_wire_text(ib)
    installed = ib.client.decoder.handlers[HISTORICAL_DATA]
    keep_wire_text(ib)
    assert ib.client.decoder.handlers[HISTORICAL_DATA] is installed and installed._keeps_text
    other = IB()
    other.client.decoder.handlers[HISTORICAL_DATA] = lambda fields: None
    with pytest.raises(WireVersionError, match="decoder changed"):
        keep_wire_text(other)
    gone = IB()
    del gone.client.decoder.handlers[HISTORICAL_DATA]
    with pytest.raises(WireVersionError, match="no handler table entry 17"):
        keep_wire_text(gone)


def test_bars_reexports_the_one_implementation():
    from feeds.ibkr import bars
    assert bars.WireBar is WireBar and bars.keep_wire_text is keep_wire_text


def test_feed_backfill_refuses_another_version_with_one_line(monkeypatch, tmp_path):
    from click.testing import CliRunner

    from feeds.ibkr.main import main
    monkeypatch.setattr(ib_async, "__version__", "2.2.0")
    r = CliRunner().invoke(main, ["--config", str(tmp_path / "absent.toml"), "--status"])
    assert r.exit_code == 1
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "ib_async 2.2.0 is installed" in lines[0]
