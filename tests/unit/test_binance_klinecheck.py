"""The kline check: the one-minute fold of aggTrades, its comparison with
Binance's closed klines, which minutes are comparable, and the collector's
handling of a mismatch (row, REST fill of the minute, second comparison)."""
import asyncio
import random
from decimal import Decimal

from collector_stubs import Notifier, Sink
from feeds.binance import adapter as A
from feeds.binance import klinecheck as KC
from feeds.binance.collector import BinanceCollector, Settings
from feeds.binance.rest import WeightLimiter
from feeds.health import Health

M0 = 1_700_000_040_000 - 1_700_000_040_000 % 60_000      # a minute start (2023-11-14)
M1, M2, M3 = M0 + 60_000, M0 + 120_000, M0 + 180_000


def tr(a, p="100.0", q="1", t=M1 + 1000, f=None, l=None):
    """(a, p, q, f, l, T): one trade per aggTrade unless f/l say otherwise."""
    f = a * 10 if f is None else f
    return (a, p, q, f, f if l is None else l, t)


def kline(t, trades, n=None, **over):
    """The closed kline Binance would send for ``trades`` (a, p, q, f, l, T) in minute ``t``."""
    c = KC.candle_of([x[:5] for x in trades])
    k = {"t": t, "T": t + 59_999, "s": "BTCUSDT", "i": "1m", "x": True,
         "f": min((x[3] for x in trades), default=-1), "L": max((x[4] for x in trades), default=-1),
         "o": str(c.open or "100.0"), "h": str(c.high or "100.0"), "l": str(c.low or "100.0"),
         "c": str(c.close or "100.0"), "v": str(c.volume), "n": c.trades if n is None else n}
    k.update(over)
    return k


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def feed(kc, sym, trades, prev):
    out = []
    for a, p, q, f, l, t in trades:
        out += kc.trade(sym, a, prev, p, q, f, l, t)
        prev = a
    return out, prev


# ------------------------------------------------------------------ the fold and the comparison

def test_candle_is_order_independent_and_counts_trades_not_aggtrades():
    trades = [(5, "10.5", "0.001", 50, 52), (6, "10.7", "0.010", 53, 53), (7, "10.1", "2", 54, 60),
              (8, "10.6", "0.3", 61, 61)]
    want = KC.Candle(Decimal("10.5"), Decimal("10.7"), Decimal("10.1"), Decimal("10.6"), Decimal("2.311"), 12, 5, 8)
    for _ in range(5):
        random.shuffle(trades)
        assert KC.candle_of(trades) == want
        fd = KC.Fold(M0, *trades[0])
        for t in trades[1:]:
            fd.add(*t)
        assert fd.candle() == want
    assert KC.candle_of(trades + trades[:2]) == want            # an id counts once
    assert KC.candle_of([]) == KC.EMPTY


def test_n_is_compared_with_the_sum_of_l_minus_f_plus_1():
    trades = [tr(1, f=10, l=12), tr(2, f=13, l=13)]             # 4 trades in 2 aggTrades
    agg = KC.candle_of([t[:5] for t in trades])
    assert agg.trades == 4
    assert KC.differences(KC.kline_candle(kline(M1, trades)), agg) == ()
    assert KC.differences(KC.kline_candle(kline(M1, trades, n=5)), agg) == ("trades",)


def test_comparison_is_exact_on_decimal_values_not_strings():
    agg = KC.candle_of([(1, "7.608", "3005", 1, 1)])
    k = KC.kline_candle({"o": "7.6080", "h": "7.60800", "l": "7.608", "c": "7.6080", "v": "3005.000", "n": 1})
    assert KC.differences(k, agg) == ()
    k2 = KC.kline_candle({"o": "7.6080", "h": "7.6081", "l": "7.608", "c": "7.6080", "v": "3005.001", "n": 1})
    assert KC.differences(k2, agg) == ("high", "volume")


def test_minute_without_trades_agrees_with_its_empty_kline_prices_not_compared():
    k = KC.kline_candle({"o": "5", "h": "5", "l": "5", "c": "5", "v": "0", "n": 0})
    assert KC.differences(k, KC.EMPTY) == ()
    k = KC.kline_candle({"o": "5", "h": "6", "l": "5", "c": "6", "v": "2", "n": 2})
    assert KC.differences(k, KC.EMPTY) == ("open", "high", "low", "close", "volume", "trades")


# ------------------------------------------------------------------ which minutes are compared

def test_partial_first_minute_is_not_comparable_whole_minute_is_compared():
    kc = KlineCheckFor()
    m0 = [tr(1, t=M0 + 30_000), tr(2, p="101.0", t=M0 + 50_000)]
    m1 = [tr(3, "99.5", "2", t=M1 + 1), tr(4, "102.25", "0.5", t=M1 + 20_000), tr(5, "100.0", "1.5", t=M1 + 59_999)]
    v, prev = feed(kc, "X", m0 + m1, None)
    assert v == []
    assert kc.kline("X", kline(M0, m0), prev * 10)[0].outcome == KC.NOT_COMPARABLE      # started inside it
    (ok,) = kc.kline("X", kline(M1, m1), prev * 10)             # L reached: compared at once
    assert ok.outcome == KC.OK and ok.agg.trades == 3 and ok.agg.high == Decimal("102.25")
    assert kc.counts == {KC.OK: 1, KC.MISMATCH: 0, KC.NOT_COMPARABLE: 1}


def test_kline_before_the_minutes_last_aggtrade_waits_for_it():
    kc = KlineCheckFor()
    _, prev = feed(kc, "X", [tr(1, t=M0 + 1)], None)
    m1 = [tr(2, t=M1 + 5), tr(3, "100.5", t=M1 + 59_990)]
    _, prev = feed(kc, "X", m1[:1], prev)
    assert kc.kline("X", kline(M1, m1), 20) == []               # its L (30) not received yet
    v, prev = feed(kc, "X", m1[1:], prev)                       # the late aggTrade of the minute
    assert [x.outcome for x in v] == [KC.OK]


def test_missed_trade_is_a_mismatch_naming_the_fields():
    kc = KlineCheckFor()
    _, prev = feed(kc, "X", [tr(1, t=M0 + 1)], None)
    m1 = [tr(2, "100.0", "1", t=M1 + 5), tr(3, "103.0", "4", t=M1 + 30_000), tr(4, "101.0", "1", t=M1 + 59_000)]
    _, prev = feed(kc, "X", [m1[0], m1[2]], prev)               # id 3 never arrived
    (v,) = kc.kline("X", kline(M1, m1), 40)
    assert v.outcome == KC.MISMATCH and v.differs == ("high", "volume", "trades")
    assert v.agg.first_id == 2 and v.agg.last_id == 4


def test_tail_trade_lost_before_a_quiet_spell_is_found_after_the_wait():
    clock = Clock()
    kc = KlineCheckFor(clock=clock)
    _, prev = feed(kc, "X", [tr(1, t=M0 + 1)], None)
    m1 = [tr(2, t=M1 + 5), tr(3, "100.5", t=M1 + 59_990)]
    _, prev = feed(kc, "X", m1[:1], prev)                       # the last one is lost, nothing follows
    assert kc.kline("X", kline(M1, m1), 20) == []
    assert kc.due({"X": 20}) == []
    clock.t += KC.WAIT_S
    (v,) = kc.due({"X": 20})
    assert v.outcome == KC.MISMATCH and "trades" in v.differs


def test_reconnect_inside_a_minute_waits_for_the_first_aggtrade_after_it():
    kc = KlineCheckFor()
    _, prev = feed(kc, "X", [tr(1, t=M0 + 1)], None)
    m1 = [tr(2, t=M1 + 5), tr(3, t=M1 + 40_000), tr(4, t=M2 + 10)]
    _, prev = feed(kc, "X", m1[:2], prev)
    kc.connection_lost(["X"])
    assert kc.kline("X", kline(M1, m1[:2]), 30) == []           # unsure: kept waiting although L was reached
    v, prev = feed(kc, "X", m1[2:], prev)                       # ids continue: nothing was lost
    assert [x.outcome for x in v] == [KC.OK]


def test_reconnect_gap_counts_once_filled_and_not_at_all_when_the_fill_fails():
    for complete in (True, False):
        kc = KlineCheckFor()
        _, prev = feed(kc, "X", [tr(1, t=M0 + 1)], None)
        m1 = [tr(2, t=M1 + 5), tr(3, "98.0", t=M1 + 40_000), tr(4, "99.0", t=M1 + 50_000)]
        _, prev = feed(kc, "X", m1[:1], prev)
        kc.connection_lost(["X"])
        v, prev = feed(kc, "X", [tr(5, t=M2 + 10)], prev)       # ids 3 and 4 lost meanwhile (fill starts at 3)
        assert kc.kline("X", kline(M1, m1), 50) == []           # waits for the fill
        if complete:
            kc.filled("X", m1[1:])
            (v,) = kc.gap_filled("X", 3, True)
            assert v.outcome == KC.OK and v.agg.trades == 3
        else:
            (v,) = kc.gap_filled("X", 3, False)
            assert v.outcome == KC.NOT_COMPARABLE


def test_ids_starting_anew_restart_the_observation():
    kc = KlineCheckFor()
    _, prev = feed(kc, "X", [tr(1, t=M0 + 1), tr(2, t=M1 + 1)], None)
    feed(kc, "X", [tr(900, t=M1 + 30_000)], None)              # an accepted jump without a known predecessor
    (v,) = kc.kline("X", kline(M1, []), 9000)
    assert v.outcome == KC.NOT_COMPARABLE


def test_state_is_bounded_minutes_dropped_once_compared_or_old():
    kc = KlineCheckFor()
    prev = None
    for i in range(60):
        _, prev = feed(kc, "X", [tr(10 + i, t=M0 + i * 60_000 + 7)], prev)
        if i % 3 == 0 and i:
            kc.kline("X", kline(M0 + (i - 1) * 60_000, [tr(9 + i, t=M0 + (i - 1) * 60_000 + 7)]), (10 + i) * 10)
    st = kc.syms["X"]
    assert len(st.folds) <= KC.KEEP_MINUTES + 1 and len(st.decided) <= KC.KEEP_MINUTES + 1
    assert kc.counts[KC.OK] == 19 and kc.counts[KC.MISMATCH] == 0


def test_quiet_symbol_minutes_without_trades_agree_and_state_stays_bounded():
    kc = KlineCheckFor()
    feed(kc, "X", [tr(1, t=M0 + 1)], None)
    for i in range(1, 200):
        (v,) = kc.kline("X", kline(M0 + i * 60_000, []), 10)      # n = 0, v = 0: no trade that minute
        assert v.outcome == KC.OK
    st = kc.syms["X"]
    assert len(st.decided) <= KC.KEEP_MINUTES + 1 and not st.folds and not st.waiting


def KlineCheckFor(clock=None):
    return KC.KlineCheck(clock=clock or Clock())


# ------------------------------------------------------------------ in the collector

class FakeRest:
    def __init__(self, trades):
        self.trades = trades
        self.limiter = WeightLimiter(1200)
        self.calls = []

    async def agg_trades(self, symbol, from_id, limit=1000):
        self.calls.append(("fromId", from_id))
        return [t for t in self.trades if t["a"] >= from_id][:limit]

    async def agg_trades_between(self, symbol, start, end, limit=1000):
        self.calls.append(("time", start, end))
        return [t for t in self.trades if start <= t["T"] <= end][:limit]


def msg(a, p, q, t):
    return {"stream": "btcusdt@aggTrade",
            "data": {"e": "aggTrade", "E": t, "a": a, "s": "BTCUSDT", "p": p, "q": q, "f": a * 3, "l": a * 3 + 2,
                     "T": t, "m": False}}


def kmsg(k):
    return {"stream": "btcusdt@kline_1m", "data": {"e": "kline", "E": k["T"] + 1, "s": "BTCUSDT",
                                                   "k": {**k, "q": "0", "V": "0", "Q": "0", "B": "0"}}}


def test_collector_hot_path_fold_equals_the_candle_of_the_same_trades():
    rng = random.Random(4)
    trades = []
    for a in range(1, 400):
        t = M0 + 20_000 + a * 700 + rng.randrange(0, 300)
        trades.append((a, f"{100 + rng.randrange(-50, 50) / 100:.2f}", f"{rng.randrange(1, 5000) / 1000:.3f}", t))
    c = BinanceCollector(Settings(symbols=["BTCUSDT"]), Sink(), Health(unit="u", notifier=Notifier()))
    c.plan(["BTCUSDT"])
    c.last_agg["BTCUSDT"] = 0
    for a, p, q, t in trades:
        c.handle(msg(a, p, q, t))
    folds = c.kc.syms["BTCUSDT"].folds
    for m, fd in folds.items():
        want = KC.candle_of([(a, p, q, a * 3, a * 3 + 2) for a, p, q, t in trades if m <= t < m + 60_000])
        assert fd.candle() == want
    assert len(folds) >= 5


def test_collector_mismatch_is_stored_filled_from_rest_and_found_repaired():
    s = Settings(symbols=["BTCUSDT"])
    c = BinanceCollector(s, Sink(), Health(unit="u", notifier=Notifier()))
    c.plan(["BTCUSDT"])
    c.last_agg["BTCUSDT"] = 0
    venue = [(1, "100.0", "1", M0 + 10), (2, "100.5", "2", M1 + 10), (3, "101.0", "0.5", M1 + 30_000),
             (4, "100.2", "1", M1 + 59_000), (5, "100.1", "1", M2 + 5)]
    c.rest = FakeRest([{"a": a, "p": p, "q": q, "f": a * 3, "l": a * 3 + 2, "T": t, "m": False}
                       for a, p, q, t in venue])
    k = kline(M1, [(a, p, q, a * 3, a * 3 + 2, t) for a, p, q, t in venue if M1 <= t < M2])

    async def go():
        c._stop = asyncio.Event()
        for a, p, q, t in venue[:3]:
            c.handle(msg(a, p, q, t))
        c.handle(kmsg(k))                   # aggTrade 4 (the minute's last) never arrived
        c.handle(msg(*venue[4]))            # the next minute: the check compares, then the ids show the gap
        await asyncio.gather(*list(c._tasks))
    asyncio.run(go())
    rows = c.sink.rows["binance_kline_check"]
    assert [r[3] for r in rows] == ["found", "after_fill"]
    found, after = rows
    cols = A.KLINE_CHECK_TABLE.columns
    found, after = dict(zip(cols, found)), dict(zip(cols, after))
    assert found["open_time"] == A.ms_text(M1) and found["differs"] == "low,close,volume,trades"
    assert found["kline_trades"] == 9 and found["agg_trades"] == 6 and found["repaired"] is None
    assert after["repaired"] is True and after["differs"] == "" and after["agg_trades"] == 9
    assert after["basis"] == "rest" and after["rest_trades"] == 3      # no database here: REST's trades compared
    assert ("time", M1, M2 - 1) in c.rest.calls
    assert 4 in {r[1] for r in c.sink.rows["binance_agg_trade"]}        # the missed trade is stored
    f = c.figures()
    assert f["kline_check_mismatched"] == 1 and f["kline_check_repaired"] == 1
    assert f["kline_check_not_comparable"] == 0 and f["kline_check_ok"] == 0


def test_collector_kline_check_off_by_setting_or_without_the_streams():
    h = Health(unit="u", notifier=Notifier())
    assert BinanceCollector(Settings(kline_check=False), Sink(), h).kc is None
    off = BinanceCollector(Settings(streams=["aggTrade", "bookTicker"]), Sink(), h)
    assert off.kc is None and "kline" in off.kline_check_off
    assert BinanceCollector(Settings(kline_intervals=["5m"]), Sink(), h).kc is None
    assert BinanceCollector(Settings(), Sink(), h).kc is not None


def test_text_ms_inverts_ms_text():
    for ms in (M0, M0 + 1, M0 + 59_999, 1_626_992_760_247):
        assert A.text_ms(A.ms_text(ms)) == ms
