"""Alert state machine (start / clear / no repeat, quiet hours, retries, the
state file) and the checks of the channel URL files."""
import json
import logging
import os
from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest

from feeds.ops import alerts
from feeds.ops.alerts import FIRING, RESOLVED, Alert, AlertState, Channels, QuietHours
from feeds.config import ConfigError
from feeds.settings import ALERTS_FILE, load

UTC = timezone.utc
T0 = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)
STALE = "stale:feed-binance.service"
DOWN = "down:feed-kite.service"
HOLDS = {STALE: ("feed-binance.service is stale", "no aggTrade for 300 s", "critical")}


def minutes(n):
    return timedelta(minutes=n)


def state(tmp_path, quiet=(), tz="UTC"):
    return AlertState(tmp_path / "alerts" / "state.json", quiet, tz)


def run(st, holding, now, accept=True):
    """One `feedctl check` run: every alert due is sent; returns [(key, status)]."""
    return [(a.key, a.status) for a, ok in st.deliver(holding, now, lambda a: accept)]


# -- start, clear, no storm -------------------------------------------------------------------


def test_start_is_told_once_then_clear_once(tmp_path):
    st = state(tmp_path)
    due = st.update(HOLDS, T0)
    assert [(a.key, a.status, a.severity) for a in due] == [(STALE, FIRING, "critical")]
    assert "feed-binance.service is stale" in due[0].title
    assert "no aggTrade for 300 s" in due[0].body
    st.mark_sent(due[0], now=T0)
    for i in range(1, 10):                                  # keeps holding: no storm
        assert st.update(HOLDS, T0 + minutes(i)) == []
    due = st.update({}, T0 + minutes(10))
    assert [(a.key, a.status) for a in due] == [(STALE, RESOLVED)]
    assert "resolved" in due[0].title and "feed-binance.service is stale" in due[0].title
    assert "10m" in due[0].body                             # how long it held
    st.mark_sent(due[0], now=T0 + minutes(10))
    assert st.update({}, T0 + minutes(11)) == []
    assert st.conditions == {}


def test_a_new_start_after_a_told_clear_is_told_again(tmp_path):
    st = state(tmp_path)
    assert run(st, HOLDS, T0) == [(STALE, FIRING)]
    assert run(st, {}, T0 + minutes(1)) == [(STALE, RESOLVED)]
    assert run(st, HOLDS, T0 + minutes(2)) == [(STALE, FIRING)]


def test_conditions_are_independent(tmp_path):
    st = state(tmp_path)
    assert run(st, HOLDS, T0) == [(STALE, FIRING)]
    both = {**HOLDS, DOWN: ("feed-kite.service is down", "inactive", "warning")}
    assert run(st, both, T0 + minutes(1)) == [(DOWN, FIRING)]
    assert run(st, {DOWN: both[DOWN]}, T0 + minutes(2)) == [(STALE, RESOLVED)]


def test_state_survives_a_new_process(tmp_path):
    assert run(state(tmp_path), HOLDS, T0) == [(STALE, FIRING)]
    assert run(state(tmp_path), HOLDS, T0 + minutes(1)) == []          # next run of feedctl check
    assert run(state(tmp_path), {}, T0 + minutes(2)) == [(STALE, RESOLVED)]
    doc = json.loads((tmp_path / "alerts" / "state.json").read_text())
    assert doc == {"version": 1, "conditions": {}}


def test_state_records_start_and_told(tmp_path):
    st = state(tmp_path)
    run(st, HOLDS, T0)
    run(st, HOLDS, T0 + minutes(5))
    c = json.loads((tmp_path / "alerts" / "state.json").read_text())["conditions"][STALE]
    assert c["started"] == "2026-03-02T12:00:00+00:00"
    assert c["told"] == "2026-03-02T12:00:00+00:00"
    assert c["cleared"] is None


def test_naive_time_and_bad_severity_are_refused(tmp_path):
    st = state(tmp_path)
    with pytest.raises(ValueError):
        st.update(HOLDS, datetime(2026, 3, 2, 12, 0))
    with pytest.raises(ValueError):
        st.update({STALE: ("t", "b", "info")}, T0)
    with pytest.raises(ValueError):
        Alert("k", "t", "b", "critical", "started")


# -- failed sends ------------------------------------------------------------------------------


def test_failed_send_is_retried_and_not_duplicated_after_success(tmp_path):
    st = state(tmp_path)
    assert run(st, HOLDS, T0, accept=False) == [(STALE, FIRING)]
    assert run(st, HOLDS, T0 + minutes(1), accept=False) == [(STALE, FIRING)]
    assert run(state(tmp_path), HOLDS, T0 + minutes(2)) == [(STALE, FIRING)]   # accepted
    assert run(state(tmp_path), HOLDS, T0 + minutes(3)) == []
    st = state(tmp_path)
    assert run(st, {}, T0 + minutes(4), accept=False) == [(STALE, RESOLVED)]
    assert run(st, {}, T0 + minutes(5)) == [(STALE, RESOLVED)]
    assert run(st, {}, T0 + minutes(6)) == []


def test_send_that_raises_counts_as_not_sent(tmp_path):
    st = state(tmp_path)

    def boom(alert):
        raise OSError("channel down")
    assert [ok for _, ok in st.deliver(HOLDS, T0, boom)] == [False]
    assert [a.status for a in st.update(HOLDS, T0 + minutes(1))] == [FIRING]


def test_an_offered_start_that_cleared_before_delivery_is_still_told(tmp_path):
    """The channel was down when the condition started and it cleared before
    the channel came back: the start is still told, then its clear."""
    st = state(tmp_path)
    assert run(st, HOLDS, T0, accept=False) == [(STALE, FIRING)]
    due = st.update({}, T0 + minutes(1))
    assert [(a.key, a.status) for a in due] == [(STALE, FIRING)]
    assert "cleared at 2026-03-02T12:01:00+00:00" in due[0].body
    st.mark_sent(due[0], now=T0 + minutes(1))
    assert run(st, {}, T0 + minutes(2)) == [(STALE, RESOLVED)]
    assert run(st, {}, T0 + minutes(3)) == []


def test_clear_then_hold_again_before_resolved_was_delivered(tmp_path):
    st = state(tmp_path)
    assert run(st, HOLDS, T0) == [(STALE, FIRING)]
    assert run(st, {}, T0 + minutes(1), accept=False) == [(STALE, RESOLVED)]
    assert run(st, HOLDS, T0 + minutes(2)) == []       # still the same told episode
    assert run(st, {}, T0 + minutes(3)) == [(STALE, RESOLVED)]


def test_each_channel_gets_an_alert_once(tmp_path):
    """Mail accepted, the webhook was down: the retry goes to the webhook only."""
    path = tmp_path / "s.json"
    st = AlertState(path, channels=["/etc/feeds/mail.url", "/etc/feeds/hook.url"])
    (a,) = st.update(HOLDS, T0)
    assert a.channels == ("/etc/feeds/mail.url", "/etc/feeds/hook.url")
    st.mark_sent(a, ["/etc/feeds/mail.url"], now=T0)
    st = AlertState(path, channels=["/etc/feeds/mail.url", "/etc/feeds/hook.url"])
    (a,) = st.update(HOLDS, T0 + minutes(1))
    assert a.status == FIRING and a.channels == ("/etc/feeds/hook.url",)
    st.mark_sent(a, ["/etc/feeds/hook.url"], now=T0 + minutes(1))
    assert st.update(HOLDS, T0 + minutes(2)) == []
    (r,) = st.update({}, T0 + minutes(3))
    assert r.status == RESOLVED and r.channels == ("/etc/feeds/mail.url", "/etc/feeds/hook.url")


def test_a_channel_removed_from_the_configuration_is_owed_nothing(tmp_path):
    path = tmp_path / "s.json"
    st = AlertState(path, channels=["a.url", "b.url"])
    (a,) = st.update(HOLDS, T0)
    st.mark_sent(a, ["a.url"], now=T0)
    st = AlertState(path, channels=["a.url"])                  # b.url dropped by the operator
    assert st.update(HOLDS, T0 + minutes(1)) == []               # a.url has it: nothing to resend
    assert st.conditions[STALE]["told"] == "2026-03-02T12:01:00+00:00"
    (r,) = st.update({}, T0 + minutes(2))
    assert r.channels == ("a.url",)


def test_marking_twice_does_not_resend(tmp_path):
    st = state(tmp_path)
    (a,) = st.update(HOLDS, T0)
    st.mark_sent(a, now=T0)
    st.mark_sent(a, now=T0 + minutes(1))
    assert st.conditions[STALE]["told"] == "2026-03-02T12:00:00+00:00"
    (r,) = st.update({}, T0 + minutes(2))
    st.mark_sent(r)
    st.mark_sent(r)
    assert st.update({}, T0 + minutes(3)) == []


# -- quiet hours -------------------------------------------------------------------------------


def test_quiet_hours_membership():
    q = QuietHours(["22:00", "07:00"], "Europe/London")
    ldn = ZoneInfo("Europe/London")
    assert datetime(2026, 7, 1, 23, 30, tzinfo=ldn) in q
    assert datetime(2026, 7, 1, 0, 0, tzinfo=ldn) in q
    assert datetime(2026, 7, 1, 6, 59, tzinfo=ldn) in q
    assert datetime(2026, 7, 1, 7, 0, tzinfo=ldn) not in q
    assert datetime(2026, 7, 1, 21, 59, tzinfo=ldn) not in q
    assert datetime(2026, 7, 1, 21, 30, tzinfo=UTC) in q          # 22:30 BST
    day = QuietHours(["12:00", "13:00"], "UTC")
    assert T0 in day and T0 + minutes(60) not in day and T0 - minutes(1) not in day
    assert T0 not in QuietHours([], "UTC")


def test_quiet_hours_spanning_midnight_hold_back_and_tell_at_end(tmp_path):
    st = state(tmp_path, ["22:00", "07:00"], "UTC")
    night = datetime(2026, 3, 2, 23, 0, tzinfo=UTC)
    assert run(st, HOLDS, night) == []                                  # starts at 23:00
    assert run(st, HOLDS, night + minutes(120)) == []                   # 01:00, still quiet
    morning = datetime(2026, 3, 3, 7, 0, tzinfo=UTC)
    assert run(st, HOLDS, morning) == [(STALE, FIRING)]                 # told at the end
    assert run(st, HOLDS, morning + minutes(1)) == []


def test_started_and_cleared_within_quiet_hours_is_never_told(tmp_path):
    st = state(tmp_path, ["22:00", "07:00"], "UTC")
    night = datetime(2026, 3, 2, 23, 0, tzinfo=UTC)
    assert run(st, HOLDS, night) == []
    assert run(st, {}, night + minutes(30)) == []
    assert run(st, {}, datetime(2026, 3, 3, 7, 0, tzinfo=UTC)) == []
    assert st.conditions == {}


def test_resolved_of_a_condition_told_before_quiet_hours_waits_for_their_end(tmp_path):
    st = state(tmp_path, ["22:00", "07:00"], "UTC")
    evening = datetime(2026, 3, 2, 21, 0, tzinfo=UTC)
    assert run(st, HOLDS, evening) == [(STALE, FIRING)]
    assert run(st, {}, evening + minutes(90)) == []                     # clears at 22:30
    assert run(st, {}, datetime(2026, 3, 3, 7, 0, tzinfo=UTC)) == [(STALE, RESOLVED)]


def test_resolved_not_told_if_the_condition_holds_again_at_the_end(tmp_path):
    st = state(tmp_path, ["22:00", "07:00"], "UTC")
    evening = datetime(2026, 3, 2, 21, 0, tzinfo=UTC)
    assert run(st, HOLDS, evening) == [(STALE, FIRING)]
    assert run(st, {}, evening + minutes(90)) == []
    assert run(st, HOLDS, evening + minutes(300)) == []                 # holds again at 02:00
    assert run(st, HOLDS, datetime(2026, 3, 3, 7, 0, tzinfo=UTC)) == []  # nothing new to tell
    assert run(st, {}, datetime(2026, 3, 3, 8, 0, tzinfo=UTC)) == [(STALE, RESOLVED)]


def test_quiet_hours_are_read_in_the_time_zone(tmp_path):
    st = state(tmp_path, ["22:00", "07:00"], "Asia/Kolkata")            # UTC+05:30
    assert run(st, HOLDS, datetime(2026, 3, 2, 17, 0, tzinfo=UTC)) == []          # 22:30 IST
    assert run(st, HOLDS, datetime(2026, 3, 3, 1, 29, tzinfo=UTC)) == []          # 06:59 IST
    assert run(st, HOLDS, datetime(2026, 3, 3, 1, 30, tzinfo=UTC)) == [(STALE, FIRING)]


# -- the state file ----------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["{not json", "[]", '{"version": 1, "conditions": []}',
                                  '{"version": 9, "conditions": {}}',
                                  '{"version": 1, "conditions": {"k": {"severity": "critical"}}}', ""])
def test_corrupt_state_file_is_logged_and_treated_as_empty(tmp_path, caplog, text):
    p = tmp_path / "alerts" / "state.json"
    p.parent.mkdir()
    p.write_text(text)
    with caplog.at_level(logging.ERROR, logger="feeds.alerts"):
        st = state(tmp_path)
    assert st.conditions == {}
    assert any("corrupt" in r.getMessage() and str(p) in r.getMessage() for r in caplog.records)
    assert run(st, HOLDS, T0) == [(STALE, FIRING)]
    assert json.loads(p.read_text())["conditions"][STALE]["told"]        # rewritten, valid


def test_missing_state_file_means_nothing_holds(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="feeds.alerts"):
        st = state(tmp_path)
    assert st.conditions == {} and not caplog.records
    assert not (tmp_path / "alerts" / "state.json").exists()


def test_state_is_written_atomically(tmp_path, monkeypatch):
    st = state(tmp_path)
    run(st, HOLDS, T0)
    p = tmp_path / "alerts" / "state.json"
    before = p.read_bytes()
    calls = []
    real_replace = os.replace

    def replace(src, dst):
        calls.append((src, dst))
        assert os.path.dirname(src) == os.path.dirname(dst)             # same file system
        assert json.loads(open(src).read())["version"] == 1            # complete before the rename
        return real_replace(src, dst)
    monkeypatch.setattr(alerts.os, "replace", replace)
    st.update({}, T0 + minutes(1))
    st.mark_sent(Alert(STALE, "t", "b", "critical", RESOLVED, ("*",)))
    assert calls and all(dst == p for _, dst in calls)

    def fail(src, dst):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(alerts.os, "replace", fail)
    st2 = state(tmp_path)
    before = p.read_bytes()
    with pytest.raises(OSError):
        st2.update(HOLDS, T0 + minutes(2))
    assert p.read_bytes() == before                                      # old state intact
    assert sorted(os.listdir(p.parent)) == ["state.json"]               # no temporary file left


def test_from_config(tmp_path):
    cfg_file = tmp_path / "alerts.toml"
    cfg_file.write_text(f'[alerts]\nstate_file = "{tmp_path}/s.json"\nquiet_hours = ["23:00", "06:00"]\n'
                        'time_zone = "America/New_York"\n')
    cfg = load(cfg_file, ALERTS_FILE)
    st = AlertState.from_config(cfg)
    assert st.path == tmp_path / "s.json"
    assert datetime(2026, 3, 3, 5, 0, tzinfo=UTC) in st.quiet                   # 00:00 EST
    assert Channels.from_config(cfg).channels == []


# -- messages ----------------------------------------------------------------------------------


def test_test_message_names_the_host():
    a = alerts.test_message("box1")
    assert a.title == "feeds: test alert from box1"
    assert a.status == FIRING and a.body
    import socket
    assert alerts.test_message().title == f"feeds: test alert from {socket.gethostname()}"


def test_unit_failure_alert():
    lines = [f"Dec 01 10:00:{i:02d} box1 feed-binance[42]: line {i}" for i in range(30)]
    a = alerts.unit_failure_alert("feed-binance.service", lines, "exit 78: see the configuration",
                                  host="box1")
    assert "feed-binance.service" in a.title and "box1" in a.title
    assert a.severity == "critical" and a.status == FIRING
    assert "systemctl status feed-binance.service" in a.body
    assert "journalctl -u feed-binance.service -e" in a.body
    assert "exit 78: see the configuration" in a.body
    assert a.body.rstrip().endswith("line 29") and "line 0" in a.body
    assert "(no journal lines)" in alerts.unit_failure_alert("x.service", [], "").body


# -- channel URL files -------------------------------------------------------------------------

SECRET_URL = "json://hooks.example.com/T0KEN-abcdef-s3cret?user=ops"
CONFIG = "/etc/feeds/alerts.toml"


def url_file(tmp_path, name, text, mode=0o600):
    p = tmp_path / name
    p.write_text(text)
    os.chmod(p, mode)
    return p


def config_error(files, caplog):
    with caplog.at_level(logging.DEBUG):
        with pytest.raises(ConfigError) as e:
            Channels(files, CONFIG, 5)
    err = e.value
    assert err.key == "alerts.url_files" and err.file == CONFIG
    assert len(str(err).splitlines()) == 1
    logged = "\n".join(r.getMessage() for r in caplog.records)
    return str(err), logged


def test_missing_url_file(tmp_path, caplog):
    text, _ = config_error([tmp_path / "nope.url"], caplog)
    assert f"secret file {tmp_path / 'nope.url'} not found" in text


def test_group_readable_url_file(tmp_path, caplog):
    p = url_file(tmp_path, "hook.url", SECRET_URL + "\n", 0o644)
    text, logged = config_error([p], caplog)
    assert str(p) in text and "readable by group/others" in text and "chmod 600" in text
    for part in ("T0KEN", "hooks.example.com", "s3cret"):
        assert part not in text and part not in logged


@pytest.mark.parametrize("bad", [
    "json://",                                                  # no host
    "nosuchscheme://T0KEN-abcdef-s3cret@hooks.example.com",     # scheme apprise does not know
    "T0KEN-abcdef-s3cret",                                      # a bare token, no scheme
    "tgram://T0KEN-abcdef-s3cret",                              # no chat id
    "slack://T0KEN-abcdef-s3cret@hooks.example.com",            # tokens missing
    "mailto://hooks.example.com?from=T0KEN-abcdef-s3cret",      # not an email address
], ids=["no-host", "unknown-scheme", "bare-token", "tgram", "slack", "mailto-from"])
def test_url_apprise_refuses(tmp_path, caplog, bad):
    p = url_file(tmp_path, "bad.url", f"# the on-call hook\n{bad}\n")
    text, logged = config_error([p], caplog)
    assert str(p) in text and "apprise does not accept" in text
    for part in ("T0KEN", "s3cret", "hooks.example.com"):
        assert part not in text
        assert part not in logged, logged
    if "T0KEN" in bad:
        assert bad not in text and bad not in logged


def test_empty_and_two_url_files(tmp_path, caplog):
    p = url_file(tmp_path, "empty.url", "# nothing yet\n\n")
    text, _ = config_error([p], caplog)
    assert f"secret file {p} holds no apprise URL" in text
    p = url_file(tmp_path, "two.url", SECRET_URL + "\n" + SECRET_URL + "\n")
    text, _ = config_error([p], caplog)
    assert str(p) in text and "T0KEN" not in text


def test_directory_is_not_a_url_file(tmp_path, caplog):
    text, _ = config_error([tmp_path], caplog)
    assert f"secret file {tmp_path} is a directory" in text


def test_good_files_build_channels_named_by_path(tmp_path):
    a = url_file(tmp_path, "a.url", f"  # comment\n\n   {SECRET_URL}   \n")
    b = url_file(tmp_path, "b.url", "mailto://127.0.0.1:2525?from=feeds@example.com&to=ops@example.com")
    logging.getLogger("apprise").setLevel(logging.NOTSET)
    ch = Channels([a, b], CONFIG, 7)
    assert logging.getLogger("apprise").level == logging.WARNING
    assert [c.file for c in ch.channels] == [str(a), str(b)]
    assert all(c.service.socket_connect_timeout == 7 for c in ch.channels)
    assert logging.getLogger("apprise").getEffectiveLevel() >= logging.WARNING


def test_apprise_logging_cannot_show_the_url(tmp_path, caplog):
    """Even with the process at DEBUG, nothing apprise logs carries the URL."""
    p = url_file(tmp_path, "hook.url", "json://127.0.0.1:9/T0KEN-abcdef-s3cret\n")
    ch = Channels([p], CONFIG, 1)
    logging.getLogger("apprise").setLevel(logging.DEBUG)              # a careless caller
    try:
        logging.getLogger("apprise").debug("JSON POST URL: http://127.0.0.1:9/T0KEN-abcdef-s3cret")
        with caplog.at_level(logging.DEBUG):
            logging.getLogger("apprise").debug("JSON POST URL: http://127.0.0.1:9/T0KEN-abcdef-s3cret")
            assert ch.send(alerts.test_message("box1")) is False       # nothing listens on port 9
    finally:
        logging.getLogger("apprise").setLevel(logging.WARNING)
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "T0KEN" not in logged and "s3cret" not in logged
    assert str(p) in logged                                              # the failure names the file


def test_no_channels_is_not_a_failure(caplog):
    with caplog.at_level(logging.WARNING, logger="feeds.alerts"):
        assert Channels([], CONFIG).send(alerts.test_message("box1")) is True
    assert "names no channel" in caplog.text
