"""Pure planning: latency models, unit parsing and the Edgent exit+cut search. No I/O, no clocks."""
