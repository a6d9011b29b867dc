"""A real `python -m flashmoe task=serve` on 127.0.0.1, any free port, for the server tests."""
from __future__ import annotations

import http.client
import json
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

KEY = "test-key"


@dataclass
class Server:
    proc: subprocess.Popen
    host: str
    port: int
    run_dir: Path
    model: str

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def request(self, method: str, path: str, body: object = None,
                key: str | None = KEY, headers: dict | None = None) -> tuple[int, dict, bytes]:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=60)
        h = {"Content-Type": "application/json", **(headers or {})}
        if key is not None:
            h["Authorization"] = f"Bearer {key}"
        if body is not None and not isinstance(body, (bytes, str)):
            body = json.dumps(body)
        conn.request(method, path, body=body, headers=h)
        res = conn.getresponse()
        data = res.read()
        conn.close()
        return res.status, {k.lower(): v for k, v in res.getheaders()}, data

    def metrics(self) -> dict[str, float]:
        _, _, text = self.request("GET", "/metrics", key=None)
        return {m[1]: float(m[2]) for m in re.finditer(r"^(flashmoe_[a-z_]+) ([0-9.e+-]+)$",
                                                      text.decode(), re.M)}

    def events(self, name: str) -> list[dict]:
        lines = (self.run_dir / "flashmoe.jsonl").read_text().splitlines()
        return [e for e in map(json.loads, lines) if e.get("event") == name]

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise


def start_server(model_path: Path, run_dir: Path, *args: str, key: str | None = KEY) -> Server:
    cmd = [sys.executable, "-m", "flashmoe", "task=serve", "task.port=0", f"model.path={model_path}",
           f"run_dir={run_dir}", *args]
    if key is not None:
        cmd.append(f"task.api_key={key}")
    run_dir.mkdir(parents=True, exist_ok=True)
    err = open(run_dir / "stderr.txt", "w")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True)
    deadline = time.time() + 120
    line = ""
    while time.time() < deadline:
        line = proc.stdout.readline()
        m = re.search(r"serving (\S+) on http://([\d.]+):(\d+)", line)
        if m:
            return Server(proc, m[2], int(m[3]), run_dir, m[1])
        if proc.poll() is not None:
            break
    proc.kill()
    raise RuntimeError(f"server did not start: {line!r} {(run_dir / 'stderr.txt').read_text()}")
