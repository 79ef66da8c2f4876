"""Exceptions raised by deviced."""


class DevicedError(Exception):
    """Root of every error raised by ``deviced``."""


class BrokerLost(DevicedError):
    """The MQTT session ended (or was never up) while a request, probe or call needed it: not a timeout."""
