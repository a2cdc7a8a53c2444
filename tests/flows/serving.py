"""Serving a registered version as a user does: loaded by mlflow.pyfunc in a fresh
process, and over HTTP by ``mlflow models serve``."""

from __future__ import annotations

import json


def serve_in_fresh_process(tracking_uri: str, uri: str, texts) -> dict:
    """A registered version's predictions on ``texts`` (a ``text`` column), from a Python
    process that loads it with mlflow.pyfunc alone; with the modules of glp, torch and
    transformers it imported (none, for a text-in ONNX version)."""
    import subprocess
    import sys

    code = f"""
import json, sys, mlflow, pandas as pd
mlflow.set_tracking_uri({tracking_uri!r}); mlflow.set_registry_uri({tracking_uri!r})
model = mlflow.pyfunc.load_model({uri!r})
out = model.predict(pd.DataFrame({{"text": {list(texts)!r}}}))
imported = sorted({{m.split(".")[0] for m in sys.modules}} & {{"glp", "torch", "transformers"}})
print(json.dumps({{"columns": list(out.columns), "imported": imported,
                  **{{c: out[c].tolist() for c in out.columns}}}}))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])



def serve_over_http(tracking_uri: str, uri: str, texts) -> dict:
    """``mlflow models serve`` (env manager local, bound to 127.0.0.1) on ``uri``: the
    JSON answer to ``texts`` POSTed to ``/invocations`` as a ``text`` column. The server is
    stopped (its whole process group) before this returns."""
    import os
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri,
           "MLFLOW_REGISTRY_URI": tracking_uri,  # mlflow runs the venv's uvicorn
           "PATH": f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ['PATH']}"}
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", uri, "--env-manager",
         "local", "--host", "127.0.0.1", "--port", str(port)], env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        body = json.dumps({"dataframe_split": {"columns": ["text"],
                                               "data": [[t] for t in texts]}}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                         headers={"Content-Type": "application/json"})
        deadline, answer = time.monotonic() + 120, None
        while answer is None and time.monotonic() < deadline and server.poll() is None:
            try:
                with urllib.request.urlopen(request, timeout=10) as response:
                    answer = json.loads(response.read())
            except OSError:
                time.sleep(0.5)
        assert answer is not None, server.stderr.read().decode()[-3000:] if server.poll() \
            is not None else "no answer in 120 s"
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)
    return answer
