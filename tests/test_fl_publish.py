"""What the ServerApp tells the coordinator about an improved stitch: its accuracy to the last digit, so a variant
that ties with another stays tied in the coordinator's ranking (a rounded value once ranked it below its twin, and
devices were moved to a variant the federation had not trained)."""
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, HTTPServer
from types import SimpleNamespace

import torch

from server.fl_server import Recorder
from server.run_config import RunSettings
from shared.config import DataConfig


def test_an_improved_stitch_is_published_with_its_exact_accuracy(tmp_path):
    seen = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - http.server's name
            self.rfile.read(int(self.headers["Content-Length"]))
            seen.append(urllib.parse.parse_qs(urllib.parse.urlparse(self.path).query))
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        settings = RunSettings(tmp_path, DataConfig(), 1, 1, 0.05, 32, "fedavg", "delta-float16/1", 0.2, 100.0, 10.0,
                               10.0, 1, 10.0, None, f"http://127.0.0.1:{server.server_port}", "", "")
        accuracy = 346 / 359  # 0.96378830083...: six decimals would make it 0.963788
        variant = SimpleNamespace(base_version=1, accuracy_initial=accuracy, accuracy=accuracy, best_accuracy=accuracy,
                                  improved=True, best={"proj.weight": torch.zeros(2, 2)})
        Recorder(7, settings).finish({"v": variant}, settings)
    finally:
        server.shutdown()
    assert len(seen) == 1 and float(seen[0]["accuracy"][0]) == accuracy
