"""The gateway's routers, one per resource: ``jobs``, ``health`` (probes and metrics), ``docs``."""
