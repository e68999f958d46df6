"""Running a federated fine-tuning job on Flower's deployment engine, and closing the loop without a coordinator.

- `SuperLink`: `flower-superlink` over TLS (with `--enable-supernode-auth` when asked), or `--insecure` when
  given no certificates, and `--disable-runtime-dependency-installation` (offline: our dependencies are already
  installed, Flower must not `uv sync`), on one HTTP port, in its own process group.
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

from shared.processes import HOST, ManagedProcess, flower_env, flower_executable, start_server
from shared.artifacts import bytes_to_tensors
from shared.catalog import Catalog, StaleVersion
from shared.errors import ConfigError, RestnetError
from shared.flower_link import INSECURE, LinkSecurity

CONNECTION = "restnet"  # the connection name in the scratch FLWR_HOME/config.toml


def app_dir() -> Path:
    """The project folder `flwr run` bundles: the one holding the pyproject.toml with [tool.flwr.app]."""
    root = Path(__file__).resolve().parents[1]
    pyproject = root / "pyproject.toml"
    if not pyproject.is_file() or "[tool.flwr.app]" not in pyproject.read_text():
        raise RestnetError(f"no Flower app project at {root}",
                           "run from a source checkout: flwr bundles the project folder, not an installed package")
    return root


@dataclass(frozen=True)
class SuperLinkTLS:
    """The SuperLink's certificate, its key, and the CA that signed it (which clients are given)."""

    ca: str
    cert: str
    key: str

    @classmethod
    def from_dir(cls, folder: Path | str) -> "SuperLinkTLS":
        """`ca.crt`, `superlink.crt`, `superlink.key` in `folder`, as docker/tls/gen_certs.py writes them."""
        folder = Path(folder)
        files = [folder / name for name in ("ca.crt", "superlink.crt", "superlink.key")]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise ConfigError(f"TLS folder {folder} lacks {', '.join(missing)}",
                              "make them with: python docker/tls/gen_certs.py --out DIR --host superlink")
        return cls(*(str(f.resolve()) for f in files))

    def args(self) -> list[str]:
        return ["--ssl-ca-certfile", self.ca, "--ssl-certfile", self.cert, "--ssl-keyfile", self.key]


class SuperLink:
    """A local `flower-superlink` serving the Fleet, Control and Runtime APIs over HTTP on one port: over TLS when
    given certificates (and then, with `node_auth`, admitting registered SuperNodes only), else plain HTTP."""

    def __init__(self, state_dir: Path, port: int | None = None, tls: SuperLinkTLS | None = None,
                 node_auth: bool = False, simulation: bool = False, env: dict | None = None):
        """`simulation`: runs go to Flower's simulation engine (Ray) instead of connected SuperNodes; `env`: extra
        environment of the SuperLink and the processes it starts (e.g. RAY_ADDRESS)."""
        if node_auth and tls is None:
            raise ConfigError("SuperNode authentication needs TLS", "give the SuperLink its certificates")
        self.state_dir, self.port, self.tls, self.node_auth = Path(state_dir), port, tls, node_auth
        self.simulation, self.env = simulation, dict(env or {})
        self.security = LinkSecurity(tls.ca) if tls else INSECURE  # what clients of this SuperLink use
        self.process: ManagedProcess | None = None

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    def _process(self, port: int) -> ManagedProcess:
        cmd = [flower_executable("flower-superlink"), *(self.tls.args() if self.tls else ["--insecure"]),
               *(["--enable-supernode-auth"] if self.node_auth else []), *(["--simulation"] if self.simulation else []),
               "--disable-runtime-dependency-installation", "--host", HOST, "--port", str(port)]
        return ManagedProcess("superlink", cmd, self.state_dir / "superlink.log",
                              env={"FLWR_HOME": str(self.state_dir / "superlink-home"), **self.env}, ports=(port,))

    def start(self, timeout: float = 60.0) -> "SuperLink":
        """Start on the given port, or on a free one (self.port says which)."""
        self.process, self.port = start_server(self._process, self.port, timeout)
        return self

    def stop(self) -> None:
        if self.process is not None:
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


def _flwr_json(args: list[str], flwr_home: Path) -> dict:
    """A `flwr ... --format json` command's answer. flwr exits 0 even when it failed: the answer says so."""
    text = _flwr([*args, "--format", "json"], flwr_home)
    start = text.find("{")
    if start < 0:
        raise RestnetError(f"flwr printed no JSON: {text.strip()[-400:]}")
    answer = json.loads(text[start:])
    if not answer.get("success", False):
        raise RestnetError(f"`flwr {' '.join(args[:2])}` failed: {answer.get('error-message', answer)}"[:800])
    return answer


def _connect(flwr_home: Path, superlink_address: str, security: LinkSecurity) -> Path:
    """A scratch FLWR_HOME whose config.toml names the SuperLink as the `flwr` CLI's connection."""
    flwr_home = Path(flwr_home)
    flwr_home.mkdir(parents=True, exist_ok=True)
    connection = {"address": superlink_address, **security.flwr_connection()}
    (flwr_home / "config.toml").write_text(tomli_w.dumps({"superlink": {"default": CONNECTION,
                                                                        CONNECTION: connection}}))
    return flwr_home


def register_supernode(superlink_address: str, security: LinkSecurity, public_key: Path, flwr_home: Path) -> int:
    """Admit a SuperNode to a SuperLink that authenticates them (`flwr supernode register`); returns its node id."""
    flwr_home = _connect(flwr_home, superlink_address, security)
    answer = _flwr_json(["supernode", "register", str(Path(public_key).resolve()), CONNECTION], flwr_home)
    return int(answer["node-id"])


def flwr_run(superlink_address: str, config: dict, flwr_home: Path, log_path: Path, security: LinkSecurity,
             timeout: float = 3600.0, echo=None, federation_config: dict | None = None) -> RunOutcome:
    """Submit this project as a Flower run, follow its log into `log_path` (and `echo`), return its final status.
    `federation_config`: the simulation engine's settings (`num-supernodes`, `client-resources-num-cpus`, ...)
    for a SuperLink started with `simulation=True`."""
    flwr_home = _connect(flwr_home, superlink_address, security)
    overrides = flwr_home / "run-config.toml"
    overrides.write_text(tomli_w.dumps(config))
    started = time.monotonic()
    federation = [arg for k, v in (federation_config or {}).items()
                  for arg in ("--federation-config", f"{k}={json.dumps(v)}")]
    run_id = str(_flwr_json(["run", str(app_dir()), CONNECTION, "--run-config", str(overrides), *federation],
                            flwr_home)["run-id"])
    deadline = time.monotonic() + timeout
    _follow_log(run_id, flwr_home, Path(log_path), timeout, echo)
    while True:  # the log stream ends with the run, or earlier if its connection broke: ask for the status
        run = _flwr_json(["list", CONNECTION, "--run-id", run_id], flwr_home)["runs"][0]
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
