"""Exporters observe; they never decide. Prometheus, Pushgateway and the JSONL trace."""
