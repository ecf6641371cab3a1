"""Prometheus metrics of a running server (`edgesplit serve --metrics-port`): an optional extra."""

from __future__ import annotations

from edgesplit.errors import EdgesplitError


def check_metrics_available() -> None:
    """Refuse --metrics-port, before anything loads, where prometheus-client is not installed."""
    try:
        import prometheus_client  # noqa: F401
    except ImportError:
        raise EdgesplitError(
            "--metrics-port needs the prometheus-client package: pip install 'edgesplit[metrics]' "
            "(or pip install prometheus-client), or leave --metrics-port out"
        ) from None
