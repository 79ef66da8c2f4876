"""Pure planning: latency models, unit parsing, bandwidth estimates and the planning policies. No I/O, no clocks."""

from pathlib import Path

# Edgent Table II latency models shipped as JSON beside the code (read by the tools and daemons).
REFERENCE_DIR = Path(__file__).resolve().parent / "reference"
