"""feeds: market-data collectors for Binance USD-M futures, Zerodha Kite and
Interactive Brokers, storing into PostgreSQL and run as systemd units."""

__version__ = "0.1.0"
