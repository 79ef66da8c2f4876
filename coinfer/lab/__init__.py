"""The lab: local processes, the emulated testbeds, the device agent and its client, traces, calibration records,
the pipeline simulation and ``coinfer demo``."""
