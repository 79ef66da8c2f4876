"""``coinfer bench``: one module per experiment family (edgent, dag, pipeline, energy, transport, load, planner),
each writing its numbers to files."""
