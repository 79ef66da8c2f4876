import subprocess
import sys


def test_planner_imports_no_runtime() -> None:
    code = ("import sys, planner.core, planner.policies, planner.edgent, planner.latency, planner.units, "
            "planner.mincut, planner.fleet, planner.pipeline, planner.errors; "
            "bad = [m for m in ('asyncio', 'aiomqtt', 'paho', 'onnxruntime', 'onnx', 'prometheus_client', "
            "'structlog', 'torch') if m in sys.modules]; print(','.join(bad))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
