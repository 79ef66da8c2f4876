"""Exceptions and error codes of the wire contract."""

from __future__ import annotations

from enum import StrEnum


class ErrorCode(StrEnum):
    """Codes carried by error replies; also the ``code`` label of error metrics."""

    MALFORMED = "malformed"  # not a valid envelope or message
    VERSION = "version"  # protocol version not spoken here
    BAD_TENSOR = "bad_tensor"  # dtype, shape or length does not match
    TOO_LARGE = "too_large"  # over the size limit
    UNKNOWN_BUNDLE = "unknown_bundle"  # this edge does not serve that bundle digest
    BAD_PLAN = "bad_plan"  # exit or cut not valid for the bundle
    BUSY = "busy"  # admission control: cannot finish before the deadline
    EXPIRED = "expired"  # the deadline had passed on arrival
    INTERNAL = "internal"  # the runtime failed
    STALE = "stale"  # a pipeline frame or plan of an epoch its stream has left (re-planned since)
    NO_PLAN = "no_plan"  # a pipeline frame for a stream this worker holds no plan for


class ProtocolError(Exception):
    """Root of every error raised by ``protocol``; ``code`` is what an error reply carries."""

    code = ErrorCode.MALFORMED


class MalformedMessage(ProtocolError):
    code = ErrorCode.MALFORMED


class VersionMismatch(ProtocolError):
    code = ErrorCode.VERSION


class TensorError(ProtocolError):
    code = ErrorCode.BAD_TENSOR


class MessageTooLarge(ProtocolError):
    code = ErrorCode.TOO_LARGE
