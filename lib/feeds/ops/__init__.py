"""Operations: alerts, checks, health scores, metrics and the control API.

They read heartbeats, tables and systemd's state, never a collector's memory."""
