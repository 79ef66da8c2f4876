"""The parts of `make deploy-check` that need no root: the README's marked steps, unit parsing, install.sh."""

import subprocess

from coinfer.ops import deploycheck
from tests.daemons.conftest import REPO


def test_the_readme_holds_the_steps_the_check_runs_in_order() -> None:
    blocks = dict(deploycheck.readme_blocks((REPO / "README.md").read_text()))
    assert list(blocks) == ["edge", "pi", "app"]
    assert "deploy/install.sh edge" in blocks["edge"] and "install.sh monitoring" in blocks["edge"]
    assert "coinfer broker add-app pi-1.camera" in blocks["edge"]
    assert "deploy/install.sh device --id pi-1 --broker edge.lan" in blocks["pi"]
    assert "/etc/coinfer/deviced.password" in blocks["pi"] and "editor" not in blocks["pi"]
    assert "--via-daemon --app camera" in blocks["app"]
    assert "/opt/coinfer/venv/bin/python camera.py" in blocks["app"]  # the application's Python, named
    script = deploycheck.readme_files((REPO / "README.md").read_text())["camera.py"]
    compile(script, "camera.py", "exec")  # a runnable script, not a snippet for an asyncio REPL
    assert "asyncio.run(main())" in script and "RemoteClient.from_config(app=\"camera\")" in script


def test_exec_start_expands_like_systemd() -> None:
    env = {"ARGS": "--web.listen-address=:9090 --log.level=warn", "X": "a b"}
    assert deploycheck._expand("/usr/bin/prometheus $ARGS", env) == [
        "/usr/bin/prometheus", "--web.listen-address=:9090", "--log.level=warn"]
    assert deploycheck._expand("-/bin/echo ${X}", env) == ["/bin/echo", "a b"]


def test_install_script_parses_and_refuses_bad_use() -> None:
    script = REPO / "deploy/install.sh"
    assert subprocess.run(["bash", "-n", str(script)], check=False).returncode == 0
    done = subprocess.run(["bash", str(script), "nonsense"], capture_output=True, text=True, check=False)
    assert done.returncode == 2 and "usage:" in done.stderr
    done = subprocess.run(["bash", str(script), "device", "--bogus"], capture_output=True, text=True, check=False)
    assert done.returncode == 2 and "unknown option --bogus" in done.stderr


def test_install_script_stops_naming_a_broker_name_that_does_not_resolve() -> None:
    """Before anything is installed (and before the root check): the name, where it must resolve, what to do."""
    done = subprocess.run(["bash", str(REPO / "deploy/install.sh"), "device", "--id", "pi-9", "--broker",
                           "no-such-edge.invalid"], capture_output=True, text=True, check=False)
    assert done.returncode == 2
    assert "'no-such-edge.invalid' does not resolve on this host (the broker" in done.stderr
    assert "/etc/hosts" in done.stderr and "==" not in done.stdout  # nothing was installed
