"""The wire contract between edged and deviced (topics, schemas, tensor encoding). Built in issue 4."""

PROTOCOL_VERSION = 1
