"""Security: no credentials leak, the HTML report escapes data, nothing is imported or unpickled
unless named (issue "Reliability and security", item 4).

1. ``vog-ray -v audit`` (a subprocess with its own Ray) reads Parquet data from a real S3 API
   (moto on 127.0.0.1) with secret-looking credentials in its environment
   (``AWS_SECRET_ACCESS_KEY=SECRETabc123…``, ``AWS_SESSION_TOKEN``), and its checkpoints from an
   HTTP server that demands Basic auth, given as URLs WITH USERINFO
   (``http://vogadmin:PASSWORDxyz789@127.0.0.1:…/epoch_1.pt``). The audit succeeds (so the secrets
   were used), and no secret appears in its stdout/stderr (debug logging on), in any object under
   the output URL (manifest, tables, raw work files, report, figures) or in the logs of its Ray
   session. The same run's ``data.class_names`` holds ``<script>alert(1)</script>``: the HTML
   report shows it as text. A model-factory module on the ``PYTHONPATH`` that the config does not
   name is imported by no process of the audit.
2. ``build_report`` on a run made without Ray escapes a ``<script>`` class name.
3. A model factory module is imported only when a config names it (checked in a subprocess).
4. Checkpoints are loaded only with ``weights_only=True`` (``torch.load`` patched to check it, and
   no ``weights_only=False`` in the package); a checkpoint that pickles an arbitrary object is
   refused and its payload never runs.
"""

from __future__ import annotations

import base64
import glob
import os
import subprocess
import sys
import textwrap
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import yaml

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
SECRET_KEY = "SECRETabc123/vogRAYsecurityTEST+9f8e7d6c5b4a3210ZZ"
SESSION_TOKEN = "SECRETtok456/vogRAYsessionTOKEN+0a1b2c3d4e5f6789YY"
ACCESS_KEY_ID = "AKIAVOGRAYSECTEST001"
USER, PASSWORD = "vogadmin", "PASSWORDxyz789"
SCRIPT = "<script>alert(1)</script>"
CLASS_NAMES = ["zero", "one", "two", SCRIPT, "four", "five", "six", "seven", "eight", "nine"]
FACTORY_MODULE = "vog_sec_factory_probe"


def _factory_source(marker: Path) -> str:
    return textwrap.dedent(f'''
        """A model factory that records every import of itself (tests/test_security.py)."""
        import os
        with open({str(marker)!r}, "a") as _f:
            _f.write(f"imported in pid {{os.getpid()}}\\n")

        def make(**kwargs):
            from vog_ray.models.registry import SmallCNN
            return SmallCNN(**kwargs)
        ''')


class _BasicAuthFiles(SimpleHTTPRequestHandler):
    """Serves a directory; every request must carry the Basic credentials."""

    def log_message(self, *args) -> None:
        pass

    def _authorised(self) -> bool:
        want = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        if self.headers.get("Authorization") == want:
            return True
        self.send_response(401)
        self.send_header("WWW-Authenticate", 'Basic realm="ckpts"')
        self.send_header("Content-Length", "0")
        self.end_headers()
        return False

    def do_GET(self) -> None:
        if self._authorised():
            super().do_GET()

    def do_HEAD(self) -> None:
        if self._authorised():
            super().do_HEAD()


@pytest.fixture(scope="module")
def http_ckpts(tiny_digits):
    srv = ThreadingHTTPServer(("127.0.0.1", 0), partial(_BasicAuthFiles, directory=tiny_digits.ckpt_dir))
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    port = srv.server_address[1]
    try:
        yield [f"http://{USER}:{PASSWORD}@127.0.0.1:{port}/epoch_{i}.pt" for i in (1, 2, 3)]
    finally:
        srv.shutdown()
        srv.server_close()


def _secrets_in(text: str) -> list[str]:
    return [s for s in (SECRET_KEY, SESSION_TOKEN, PASSWORD) if s in text]


def test_no_credentials_anywhere_and_the_report_escapes_class_names(tiny_digits, http_ckpts, s3_server, tmp_path):
    from vog_ray.testing.writers import write_parquet_split
    from vog_ray.storage import resolve

    factory_dir = tmp_path / "factory"
    factory_dir.mkdir()
    marker = tmp_path / "factory-imports.txt"
    (factory_dir / f"{FACTORY_MODULE}.py").write_text(_factory_source(marker))
    s3 = s3_server
    write_parquet_split(s3.url("data/train"), tiny_digits.imgs[:96], tiny_digits.labels[:96], storage=s3.storage,
                        rows_per_file=48)
    cfg = tiny_digits.config({"train": {"format": "parquet", "url": s3.url("data/train")}}, s3.url("out"),
                             checkpoints=http_ckpts, storage={"endpoint_url": s3.endpoint, "region": "us-east-1"},
                             report={"enabled": True, "bootstrap": 20},
                             compute={"device": "cpu", "batch_size": 32, "decode_batch_size": 32})
    cfg["data"]["class_names"] = CLASS_NAMES
    cfg["output"]["keep_work"] = True  # the work files are searched for secrets too
    cfg_path = tmp_path / "audit.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_ADDRESS"))}
    env.update({"AWS_ACCESS_KEY_ID": ACCESS_KEY_ID, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
                "AWS_SESSION_TOKEN": SESSION_TOKEN, "AWS_DEFAULT_REGION": "us-east-1",
                "RAY_AUTH_MODE": "disabled", "VOG_RAY_TORCH_THREADS": "1",
                "PYTHONPATH": os.pathsep.join([str(REPO), str(factory_dir)])})
    p = subprocess.Popen([sys.executable, "-m", "vog_ray.cli", "-v", "audit", str(cfg_path)], cwd=REPO, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = p.communicate(timeout=600)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, 9)
    assert p.returncode == 0, stdout[-2000:] + stderr[-6000:]
    assert "report:" in stdout

    # 1. the CLI's own output (debug logging on)
    assert not _secrets_in(stdout + stderr), _secrets_in(stdout + stderr)
    # 2. every object under the output URL: manifest, tables, work files, report, figures
    keys = s3.list("out/")
    assert any(k.endswith("/manifest.json") for k in keys) and any(k.endswith("/report.html") for k in keys)
    assert any("/_work/" in k for k in keys)
    fs, _ = resolve(s3.url(""), s3.storage)
    for k in keys:
        blob = fs.cat_file(f"{s3.bucket}/{k}")
        for secret in (SECRET_KEY, SESSION_TOKEN, PASSWORD, ACCESS_KEY_ID):
            assert secret.encode() not in blob, (secret, k)
    manifest = fs.cat_file(f"{s3.bucket}/" + next(k for k in keys if k.endswith("/manifest.json"))).decode()
    assert "http://***:***@127.0.0.1" in manifest  # the checkpoint URLs, redacted
    # 3. the logs of the CLI's Ray session (its directory ends with the driver's pid)
    logs = [f for d in glob.glob(f"/tmp/ray/session_*_{p.pid}") for f in glob.glob(f"{d}/logs/**/*", recursive=True)
            if os.path.isfile(f)]
    assert logs, "the audit's Ray session logs were not found"
    for f in logs:
        text = Path(f).read_bytes().decode("utf-8", "replace")
        assert not _secrets_in(text), (f, _secrets_in(text))
    # the HTML report shows the class name as text
    html = fs.cat_file(f"{s3.bucket}/" + next(k for k in keys if k.endswith("/report.html"))).decode()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert SCRIPT not in html
    # the factory module on the PYTHONPATH was not named by the config: no process imported it
    assert not marker.exists(), marker.read_text()


def test_build_report_escapes_a_script_class_name(digits_report):
    """A run made without Ray (conftest ``digits_report``, class 9 named ``SCRIPT``)."""
    run_url, _ = digits_report
    html = (Path(run_url) / "report.html").read_text()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert SCRIPT not in html


def test_a_model_factory_module_is_imported_only_when_named(tiny_digits, tmp_path):
    factory_dir = tmp_path / "factory"
    factory_dir.mkdir()
    marker = tmp_path / "imports.txt"
    (factory_dir / f"{FACTORY_MODULE}.py").write_text(_factory_source(marker))
    named = tiny_digits.config({"train": {"format": "parquet", "url": str(tmp_path)}}, str(tmp_path / "out"))
    named["model"] = {**tiny_digits.MODEL, "name": f"{FACTORY_MODULE}:make"}
    other = tiny_digits.config({"train": {"format": "parquet", "url": str(tmp_path)}}, str(tmp_path / "out"))
    (tmp_path / "named.yaml").write_text(yaml.safe_dump(named))
    (tmp_path / "other.yaml").write_text(yaml.safe_dump(other))
    script = textwrap.dedent(f'''
        import sys
        import numpy as np
        from vog_ray.cli import main
        from vog_ray.config import load_config
        from vog_ray.models.checkpoints import load_checkpoints
        from vog_ray.single import score
        M = {FACTORY_MODULE!r}
        # a config naming another model: validate, load its checkpoints, score with it
        assert main(["validate", {str(tmp_path / "other.yaml")!r}]) == 0
        cfg = load_config({str(tmp_path / "other.yaml")!r})
        load_checkpoints(cfg.model, cfg.checkpoints)
        x = np.random.default_rng(0).random((8, 1, 8, 8)).astype(np.float32)
        score(x, np.arange(8) % 10, model=cfg.model, checkpoints=cfg.checkpoints, device="cpu")
        assert M not in sys.modules, "imported without being named"
        # validating a config that names it does not import it either (nothing is built)
        assert main(["validate", {str(tmp_path / "named.yaml")!r}]) == 0
        assert M not in sys.modules, "imported by validate"
        # building the model of the config that names it imports it
        cfg = load_config({str(tmp_path / "named.yaml")!r})
        load_checkpoints(cfg.model, cfg.checkpoints)
        assert M in sys.modules
        print("OK")
        ''')
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(factory_dir)])}
    r = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 and "OK" in r.stdout, r.stdout[-2000:] + r.stderr[-4000:]
    assert marker.read_text().count("imported in pid") == 1


class _Payload:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_checkpoints_load_only_with_weights_only(tiny_digits, tmp_path, monkeypatch):
    import torch

    from vog_ray.models.checkpoints import CheckpointError, load_state_dict
    from vog_ray.models.checkpoints import load_checkpoints
    from vog_ray.single import score

    calls = []
    real_load = torch.load

    def checked_load(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        assert kwargs.get("weights_only") is True, f"torch.load called with weights_only={kwargs.get('weights_only')}"
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", checked_load)
    load_checkpoints(tiny_digits.MODEL, tiny_digits.ckpt_glob)
    x = tiny_digits.imgs[:16, None].astype(np.float32) / 255
    score(x, tiny_digits.labels[:16], model=tiny_digits.MODEL, checkpoints=tiny_digits.ckpt_glob, device="cpu")
    assert len(calls) >= 6 and all(c is True for c in calls)
    # a checkpoint that pickles an arbitrary callable: refused, the payload never runs
    marker = tmp_path / "PAYLOAD_RAN"
    evil = tmp_path / "evil.pt"
    sd = real_load(sorted(Path(tiny_digits.ckpt_dir).glob("epoch_*.pt"))[0], weights_only=True)
    torch.save({"state_dict": sd, "hook": _Payload(str(marker))}, evil)
    with pytest.raises(CheckpointError, match=r"evil\.pt' cannot be loaded with weights_only=True"):
        load_state_dict(str(evil))
    assert not marker.exists()
    # and nothing in the package asks torch for a full unpickle
    for f in (REPO / "vog_ray").rglob("*.py"):
        text = f.read_text()
        assert "weights_only=False" not in text.replace(" ", ""), f
        assert "allow_pickle=True" not in text.replace(" ", ""), f
