"""Running a federated fine-tuning job on Flower's deployment engine, and closing the loop without a coordinator.

- `SuperLink`: `flower-superlink --insecure --disable-runtime-dependency-installation` (offline: our
  dependencies are already installed, Flower must not `uv sync`) on one HTTP port, in its own process group.
- `flwr_run`: submits this project as a Flower app (`flwr run`, which bundles the project folder into a FAB that
  the SuperLink and SuperNodes unpack and import) with a run config, follows its log to the end and returns the
  run's final status. The `flwr` CLI gets a scratch FLWR_HOME whose config.toml names the SuperLink.
- `commit_results`: each improved variant's new stitching weights become its next version in the catalog
  (what the coordinator does when the ServerApp reports to it instead).
"""
from __future__ import annotations

import json
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import tomli_w

from shared.processes import HOST, ManagedProcess, flower_env, flower_executable, free_port
from shared.artifacts import bytes_to_tensors
from shared.catalog import Catalog, StaleVersion
from shared.errors import RestnetError

CONNECTION = "restnet"  # the connection name in the scratch FLWR_HOME/config.toml


def app_dir() -> Path:
    """The project folder `flwr run` bundles: the one holding the pyproject.toml with [tool.flwr.app]."""
    root = Path(__file__).resolve().parents[1]
    pyproject = root / "pyproject.toml"
    if not pyproject.is_file() or "[tool.flwr.app]" not in pyproject.read_text():
        raise RestnetError(f"no Flower app project at {root}",
                           "run from a source checkout: flwr bundles the project folder, not an installed package")
    return root


class SuperLink:
    """A local `flower-superlink` serving the Fleet, Control and Runtime APIs over HTTP on one port."""

    def __init__(self, state_dir: Path, port: int | None = None):
        self.state_dir = Path(state_dir)
        self.port = port or free_port()
        cmd = [flower_executable("flower-superlink"), "--insecure", "--disable-runtime-dependency-installation",
               "--host", HOST, "--port", str(self.port)]
        self.process = ManagedProcess("superlink", cmd, self.state_dir / "superlink.log",
                                      env={"FLWR_HOME": str(self.state_dir / "superlink-home")}, ports=(self.port,))

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    def start(self, timeout: float = 60.0) -> "SuperLink":
        self.process.start()
        self.process.wait_ready(self.port, timeout)
        return self

    def stop(self) -> None:
        self.process.stop()


@dataclass
class RunOutcome:
    run_id: str
    status: str  # Flower's: finished:completed, finished:failed, finished:stopped
    details: str
    seconds: float

    @property
    def ok(self) -> bool:
        return self.status == "finished:completed"


def _flwr(args: list[str], flwr_home: Path, timeout: float = 120.0) -> str:
    proc = subprocess.run([flower_executable("flwr"), *args], capture_output=True, text=True, timeout=timeout,
                          env=flower_env({"FLWR_HOME": str(flwr_home)}))
    if proc.returncode != 0:
        raise RestnetError(f"`flwr {' '.join(args[:2])}` failed: {(proc.stdout + proc.stderr).strip()[-800:]}")
    return proc.stdout


def _json_tail(text: str) -> dict:
    """The JSON document `flwr ... --format json` prints (after any plain lines)."""
    start = text.find("{")
    if start < 0:
        raise RestnetError(f"flwr printed no JSON: {text.strip()[-400:]}")
    return json.loads(text[start:])


def flwr_run(superlink_address: str, config: dict, flwr_home: Path, log_path: Path, timeout: float = 3600.0,
             echo=None, root_certificates: str | None = None) -> RunOutcome:
    """Submit this project as a Flower run, follow its log into `log_path` (and `echo`), return its final status.

    `root_certificates`: the CA of a TLS SuperLink; without it the connection is plain HTTP (`insecure`)."""
    flwr_home = Path(flwr_home)
    flwr_home.mkdir(parents=True, exist_ok=True)
    security = {"root-certificates": str(Path(root_certificates).resolve())} if root_certificates else {"insecure": True}
    connection = {"address": superlink_address, **security}
    (flwr_home / "config.toml").write_text(tomli_w.dumps({"superlink": {"default": CONNECTION,
                                                                        CONNECTION: connection}}))
    overrides = flwr_home / "run-config.toml"
    overrides.write_text(tomli_w.dumps(config))
    started = time.monotonic()
    answer = _json_tail(_flwr(["run", str(app_dir()), CONNECTION, "--run-config", str(overrides),
                               "--format", "json"], flwr_home))
    if not answer.get("success"):
        raise RestnetError(f"the SuperLink did not start the run: {answer}")
    run_id = str(answer["run-id"])
    deadline = time.monotonic() + timeout
    _follow_log(run_id, flwr_home, Path(log_path), timeout, echo)
    while True:  # the log stream ends with the run, or earlier if its connection broke: ask for the status
        run = _json_tail(_flwr(["list", CONNECTION, "--run-id", run_id, "--format", "json"], flwr_home))["runs"][0]
        if run["status"].startswith("finished"):
            return RunOutcome(run_id, run["status"], run.get("status-details", ""), time.monotonic() - started)
        if time.monotonic() > deadline:
            _flwr(["stop", run_id, CONNECTION], flwr_home)
            raise RestnetError(f"run {run_id} did not finish within {timeout:.0f}s; stopped it", f"see {log_path}")
        time.sleep(5.0)


def _follow_log(run_id: str, flwr_home: Path, log_path: Path, timeout: float, echo) -> None:
    """`flwr log --stream` ends when the run has finished; stop the run if it outlasts `timeout`."""
    cmd = [flower_executable("flwr"), "log", run_id, CONNECTION, "--stream"]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=flower_env({"FLWR_HOME": str(flwr_home)}))
    expired = threading.Event()

    def expire():
        expired.set()
        proc.kill()

    timer = threading.Timer(timeout, expire)
    timer.start()
    try:
        with open(log_path, "a") as log:
            for line in proc.stdout:
                log.write(line)
                log.flush()
                if echo:
                    echo(line.rstrip("\n"))
        proc.wait()
    finally:  # on Ctrl-C too: the stream would otherwise outlive us until the SuperLink goes
        timer.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if expired.is_set():
        _flwr(["stop", run_id, CONNECTION], flwr_home)
        raise RestnetError(f"run {run_id} did not finish within {timeout:.0f}s; stopped it", f"see {log_path}")


def commit_results(catalog_dir: Path, results_dir: Path) -> tuple[list[tuple[str, int]], list[StaleVersion]]:
    """Publish each improved variant's new stitching weights as its next catalog version, with its accuracy.

    Returns (variant, new version) for each one published, and the refusals of variants whose catalog version
    moved on since the run started (another writer published meanwhile): those are left as the other writer made
    them."""
    catalog = Catalog.load(catalog_dir)
    results = json.loads((Path(results_dir) / "results.json").read_text())
    committed, refused = [], []
    for vid, entry in sorted(results["variants"].items()):
        if not entry.get("improved"):
            continue
        state = bytes_to_tensors((Path(results_dir) / entry["stitch_file"]).read_bytes())
        try:
            new = catalog.publish_stitch(vid, state, float(entry["accuracy"]), entry["base_version"])
        except StaleVersion as exc:
            refused.append(exc)
            continue
        committed.append((vid, new.version))
    return committed, refused
