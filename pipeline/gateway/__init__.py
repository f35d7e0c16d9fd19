"""The HTTP gateway (``tuwen gateway serve``): the app factory is ``tuwen.pipeline.gateway.app``."""
