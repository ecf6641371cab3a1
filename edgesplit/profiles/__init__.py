"""The split-point profiler (`splitpoint.py` and its parts): it measures client and server both, so it sits above
them. The device profiles it reads live below the client, in `edgesplit.devices`."""
