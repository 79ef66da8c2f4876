"""onnxruntime, imported through here with its telemetry off unless the user chose otherwise: a device or an
edge server does not phone home, and a service user without a writable home (systemd's DynamicUser, an
application's system user) would otherwise get a warning on every start."""

import os

os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

import onnxruntime

__all__ = ["onnxruntime"]
