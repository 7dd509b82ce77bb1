"""Stand-ins for what a collector is given in unit tests: a sink that keeps the rows it is
handed, and a systemd notifier that drops every message."""


class Sink:
    """Rows handed to the sink, per table, in order; every flush succeeds; never spooling."""

    spooling = False

    def __init__(self):
        self.rows = {}

    def add(self, t, r):
        self.rows.setdefault(t, []).append(r)

    def add_many(self, t, rs):
        self.rows.setdefault(t, []).extend(rs)

    def flush(self, timeout=0):
        return True


class Notifier:
    """A systemd notifier that sends nothing."""

    def notify(self, m):
        pass
