"""The coinfer tool: CLI dispatcher, benchmarks and (later) the testbed. Nothing imports it."""

__version__ = "0.1.0"
