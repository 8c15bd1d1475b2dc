"""Spec: every launch script's --dry_run prints exactly the commands it would run (checked word by
word after shell parsing, so quoting is right), and bad flags fail with a message naming them.
No gcloud, xpk or SLURM is needed: dry runs start nothing."""

import os
import shlex
import subprocess
import sys

from conftest import REPO

OVERRIDE = "--config.data.name=it's a name"   # A space and a quote: the quoting must hold.


def _dry_run(script, *args):
  result = subprocess.run(["bash", os.path.join(REPO, "launch", script), "--dry_run", *args],
                          cwd=REPO, capture_output=True, text=True, timeout=30)
  assert result.returncode == 0, result.stderr
  return [shlex.split(line) for line in result.stdout.splitlines()]


def _train_words(command: str) -> list[str]:
  """The words of the `python -m coca_jax.train ...` part of a remote command string."""
  words = shlex.split(command)
  return words[words.index("-m") - 1:]


def test_tpu_pod_single_slice_runs_train_on_every_worker():
  commands = _dry_run("tpu_pod.sh", "--tpu", "pod-1", "--zone", "us-east5-a", "--project", "proj",
                      "--config", "experiments/coca_base.py:batch=4096",
                      "--workdir", "gs://bucket/run", "--", OVERRIDE)
  assert len(commands) == 2
  check, ssh = commands
  # First the config check on this machine, with the run's overrides.
  assert check == ["env", "JAX_PLATFORMS=cpu", "python3", "-m", "coca_jax.train", "--config",
                   "experiments/coca_base.py:batch=4096", "--dry_run", OVERRIDE]
  assert ssh[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"]
  assert ssh[5] == "pod-1" and "--worker=all" in ssh
  assert ssh[ssh.index("--zone") + 1] == "us-east5-a" and ssh[ssh.index("--project") + 1] == "proj"
  remote = ssh[ssh.index("--command") + 1]
  assert remote.startswith("cd coca_jax && ")
  assert _train_words(remote) == ["python3", "-m", "coca_jax.train", "--config",
                                  "experiments/coca_base.py:batch=4096", "--workdir",
                                  "gs://bucket/run", OVERRIDE]


def test_tpu_pod_multislice_create_setup_and_dcn_mesh():
  commands = _dry_run("tpu_pod.sh", "--tpu", "qr", "--zone", "z", "--config", "c.py",
                      "--workdir", "gs://b/r", "--slices", "4", "--accelerator_type", "v5p-128",
                      "--create", "--setup")
  _, create, archive, copy, install, train = commands
  assert create[:5] == ["gcloud", "compute", "tpus", "queued-resources", "create"]
  assert create[create.index("--node-count") + 1] == "4"
  assert create[create.index("--accelerator-type") + 1] == "v5p-128"
  assert archive[:2] == ["git", "archive"]
  assert copy[:5] == ["gcloud", "compute", "tpus", "queued-resources", "scp"]
  assert "--node=all" in install and "pip" in install[install.index("--command") + 1]
  # A gs:// workdir needs the gcs extra (gcsfs) on every worker.
  assert shlex.split(install[install.index("--command") + 1])[-2:] == ["-e", "coca_jax[gcs]"]
  assert train[:5] == ["gcloud", "compute", "tpus", "queued-resources", "ssh"]
  assert "--node=all" in train and "--worker=all" in train
  words = _train_words(train[train.index("--command") + 1])
  assert words[-1] == "--config.mesh.dcn_data=4"


def test_tpu_pod_check_fit_compiles_for_the_slice_before_creating_it(tmp_path):
  """--check_fit runs the TPU compiler's fit check here first, with the run's own overrides, so
  a config that does not fit stops before a VM is created; it covers one slice only."""
  commands = _dry_run("tpu_pod.sh", "--tpu", "t", "--zone", "z", "--config", "c.py:batch=256",
                      "--workdir", "gs://b/r", "--accelerator_type", "v5litepod-16", "--create",
                      "--check_fit", "v5e:4x4", "--", OVERRIDE)
  _, check, create, train = commands
  assert check == ["python3", "-m", "coca_jax.bench", "--config", "c.py:batch=256", "--mode",
                   "compile", "--target", "v5e:4x4", OVERRIDE]
  assert create[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "create"]
  # Not in a dry run: the check's failure (no fit; here, no such config) starts nothing.
  fake_bin = tmp_path / "bin"
  fake_bin.mkdir()
  (fake_bin / "gcloud").write_text("#!/bin/sh\necho gcloud ran >&2\nexit 0\n")
  (fake_bin / "gcloud").chmod(0o755)
  env = dict(os.environ, PATH=f"{fake_bin}:{os.environ['PATH']}", PYTHON="false")
  result = subprocess.run(["bash", os.path.join(REPO, "launch", "tpu_pod.sh"), "--tpu", "t",
                           "--zone", "z", "--config", "c.py", "--workdir", "gs://b/r",
                           "--check_fit", "v5e:4x4"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=30)
  assert result.returncode != 0 and "gcloud ran" not in result.stderr
  result = subprocess.run(["bash", os.path.join(REPO, "launch", "tpu_pod.sh"), "--dry_run",
                           "--tpu", "t", "--zone", "z", "--config", "c.py", "--workdir", "w",
                           "--slices", "2", "--check_fit", "v5e:4x4"],
                          capture_output=True, text=True, timeout=30)
  assert result.returncode == 2 and "--check_fit compiles one slice" in result.stderr


def test_gke_xpk_workload_command():
  _, xpk = _dry_run("gke_xpk.sh", "--cluster", "c1", "--zone", "z", "--project", "p",
                    "--tpu_type", "v5p-256", "--workload", "coca-base-1", "--slices", "2",
                    "--dcn_axis", "fsdp", "--docker_image", "gcr.io/p/coca:1",
                    "--config", "experiments/coca_base.py", "--workdir", "gs://b/r", "--", OVERRIDE)
  assert xpk[:3] == ["xpk", "workload", "create"]
  flag = lambda name: xpk[xpk.index(name) + 1]
  assert (flag("--cluster"), flag("--tpu-type"), flag("--num-slices"), flag("--workload"),
          flag("--docker-image")) == ("c1", "v5p-256", "2", "coca-base-1", "gcr.io/p/coca:1")
  assert _train_words(flag("--command")) == [
      "python3", "-m", "coca_jax.train", "--config", "experiments/coca_base.py", "--workdir",
      "gs://b/r", "--config.mesh.dcn_fsdp=2", OVERRIDE]


def test_slurm_sbatch_srun_command_and_signal_reaches_tasks():
  (srun,) = _dry_run("slurm_gpu.sbatch", "--config", "experiments/coca_base.py",
                     "--workdir", "/shared/run", "--", OVERRIDE)
  assert srun[0] == "srun"
  assert srun[srun.index("-m"):] == ["-m", "coca_jax.train", "--config",
                                     "experiments/coca_base.py", "--workdir", "/shared/run",
                                     OVERRIDE]
  directives = [line for line in open(os.path.join(REPO, "launch", "slurm_gpu.sbatch"))
                if line.startswith("#SBATCH")]
  # `B:` would signal the batch shell only; the training tasks must get SIGTERM themselves.
  assert "#SBATCH --signal=TERM@120\n" in directives


def test_local_multiprocess_one_command_per_process():
  commands = _dry_run("local_multiprocess.sh", "--num_processes", "3", "--port", "1234",
                      "--config", "experiments/demo.py:smoke", "--workdir", "/tmp/r", "--",
                      OVERRIDE)
  assert len(commands) == 3
  for i, words in enumerate(commands):
    assert words[words.index("--process_id") + 1] == str(i)
    assert words[words.index("--num_processes") + 1] == "3"
    assert words[words.index("--coordinator_address") + 1] == "127.0.0.1:1234"
    assert words[-1] == OVERRIDE


def test_launch_scripts_name_missing_and_unknown_flags():
  for script, needed in (("tpu_pod.sh", "--tpu --zone --config --workdir"),
                         ("gke_xpk.sh", "--cluster --zone --tpu_type --workload --config")):
    result = subprocess.run(["bash", os.path.join(REPO, "launch", script), "--dry_run"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and needed in result.stderr, result.stderr
  result = subprocess.run(["bash", os.path.join(REPO, "launch", "tpu_pod.sh"), "--zonee", "z"],
                          capture_output=True, text=True, timeout=30)
  assert result.returncode == 2 and "unknown argument '--zonee'" in result.stderr


def test_slurm_batch_shell_forwards_sigterm_to_srun(tmp_path):
  """If only the batch shell is signalled (`--signal=B:TERM`, `scancel --batch`), srun still
  gets SIGTERM (and srun passes it to the tasks). A stub `srun` records what reaches it."""
  import signal
  import time
  stub = tmp_path / "srun"
  stub.write_text("#!/usr/bin/env bash\n"
                  f"trap 'echo TERM > {tmp_path}/got; exit 7' TERM\n"
                  f"echo $$ > {tmp_path}/pid; echo \"$@\" > {tmp_path}/args\n"
                  "while true; do sleep 0.1; done\n")
  stub.chmod(0o755)
  proc = subprocess.Popen(
      ["bash", os.path.join(REPO, "launch", "slurm_gpu.sbatch"), "--config", "c.py",
       "--workdir", "/w"], env={**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"})
  try:
    deadline = time.time() + 20
    while not (tmp_path / "args").exists() and time.time() < deadline:
      time.sleep(0.1)
    assert "-m coca_jax.train --config c.py --workdir /w" in (tmp_path / "args").read_text()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 7          # The batch script ends with srun's exit status.
    assert (tmp_path / "got").read_text().strip() == "TERM"
  finally:  # On failure, leave no stub behind (only the processes this test started).
    if proc.poll() is None:
      proc.kill()
    if (tmp_path / "pid").exists():
      pid = int((tmp_path / "pid").read_text())
      try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
          ours = str(tmp_path).encode() in f.read()
      except OSError:
        ours = False
      if ours:
        os.kill(pid, signal.SIGKILL)


def _fake_bin(tmp_path, *names, python_summary=None):
  """A PATH dir whose `names` only record that they ran (to tmp_path/ran); with python_summary,
  a `python3` whose `-m coca_jax.train` prints that dry-run summary (other uses: the real one)."""
  fake = tmp_path / "bin"
  fake.mkdir(exist_ok=True)
  for name in names:
    (fake / name).write_text(f"#!/bin/sh\necho {name} \"$@\" >> {tmp_path}/ran\n")
    (fake / name).chmod(0o755)
  if python_summary is not None:
    (fake / "python3").write_text(
        "#!/bin/sh\n"
        f"if [ \"$1 $2\" = '-m coca_jax.train' ]; then echo '{python_summary}'; exit 0; fi\n"
        f"exec {sys.executable} \"$@\"\n")
    (fake / "python3").chmod(0o755)
  return dict(os.environ, PATH=f"{fake}:{os.environ['PATH']}")


def _launch(script, *args, env=None):
  return subprocess.run(["bash", os.path.join(REPO, "launch", script), *args], cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=60)


def test_dry_run_after_double_dash_is_a_dry_run_that_runs_nothing(tmp_path):
  """`--dry_run` placed among the train args after `--` must never launch for real: the script
  prints its commands (the train command keeps the flag) and runs none of them."""
  env = _fake_bin(tmp_path, "gcloud", "xpk", "srun", "python", "python3")
  pod = ["--tpu", "t", "--zone", "z", "--config", "experiments/coca_base.py", "--workdir",
         "gs://b/r"]
  cases = {
      "tpu_pod.sh": [*pod, "--create", "--accelerator_type", "v5p-8", "--setup"],
      "gke_xpk.sh": ["--cluster", "c", "--zone", "z", "--tpu_type", "v5p-8", "--workload", "w",
                     "--config", "experiments/coca_base.py", "--workdir", "gs://b/r"],
      "local_multiprocess.sh": ["--config", "experiments/demo.py:smoke", "--workdir", "/tmp/r",
                                "--port", "1"],
      "slurm_gpu.sbatch": ["--config", "experiments/coca_base.py", "--workdir", "/shared/r"],
  }
  for script, args in cases.items():
    for flag in ("--dry_run", "--dry_run=true"):
      result = _launch(script, *args, "--", "--config.train.steps=5", flag, env=env)
      assert result.returncode == 0, (script, result.stderr)
      assert "a dry run" in result.stderr, (script, result.stderr)
      assert not (tmp_path / "ran").exists(), (script, (tmp_path / "ran").read_text())
      train = [shlex.split(line) for line in result.stdout.splitlines()][-1]
      assert flag in shlex.split(" ".join(train)), (script, result.stdout)
  # local.sh hands every flag to coca_jax.train, whose --dry_run trains nothing.
  env_local = dict(env, PYTHON=str(tmp_path / "bin" / "python"))
  result = _launch("local.sh", "experiments/demo.py", "/tmp/w", "--", "--dry_run", env=env_local)
  assert result.returncode == 0, result.stderr
  assert (tmp_path / "ran").read_text().split() == [
      "python", "-m", "coca_jax.train", "--config", "experiments/demo.py", "--workdir", "/tmp/w",
      "--dry_run"]


def test_every_launch_script_has_help():
  for script in ("local.sh", "local_multiprocess.sh", "tpu_pod.sh", "gke_xpk.sh",
                 "slurm_gpu.sbatch"):
    for flag in ("-h", "--help"):
      result = _launch(script, flag)
      assert result.returncode == 0 and not result.stderr, (script, flag, result.stderr)
      assert "--dry_run" in result.stdout and "--config" in result.stdout.replace(
          "CONFIG", "--config"), (script, result.stdout)
  result = _launch("local.sh", "experiments/demo.py")
  assert result.returncode == 2 and "needs CONFIG and WORKDIR" in result.stderr


def test_pods_mount_the_data_bucket_with_gcsfuse_on_every_worker():
  commands = _dry_run("tpu_pod.sh", "--tpu", "t", "--zone", "z", "--config", "c.py",
                      "--workdir", "gs://b/r", "--slices", "2", "--gcsfuse", "gs://my-data",
                      "--", "--config.data.data_dir=/tmp/gcsfuse/my-data/tfds")
  _, mount, train = commands
  assert mount[:5] == ["gcloud", "compute", "tpus", "queued-resources", "ssh"]
  assert "--worker=all" in mount and "--node=all" in mount
  remote = mount[mount.index("--command") + 1]
  # Installed where missing (TPU VM images lack it), then mounted once per worker.
  assert "apt-get install -y -qq gcsfuse" in remote and "command -v gcsfuse" in remote
  assert remote.endswith("mkdir -p /tmp/gcsfuse/my-data && { mountpoint -q /tmp/gcsfuse/my-data "
                         "|| gcsfuse --implicit-dirs my-data /tmp/gcsfuse/my-data; }")
  assert "coca_jax.train" in train[train.index("--command") + 1]
  # GKE: every pod mounts before it trains (one command per pod).
  _, xpk = _dry_run("gke_xpk.sh", "--cluster", "c", "--zone", "z", "--tpu_type", "v5p-8",
                    "--workload", "w", "--config", "c.py", "--workdir", "gs://b/r", "--gcsfuse",
                    "my-data", "--gcsfuse_dir", "/data")
  command = xpk[xpk.index("--command") + 1]
  assert command.index("gcsfuse --implicit-dirs my-data /data") < command.index("coca_jax.train")
  for bad in ("gs://my-data/tfds", "My_Bucket"):
    result = _launch("tpu_pod.sh", "--dry_run", "--tpu", "t", "--zone", "z", "--config", "c.py",
                     "--workdir", "w", "--gcsfuse", bad)
    assert result.returncode == 2 and "give a bucket name" in result.stderr, result.stderr


def test_empty_data_name_is_refused_before_anything_is_created(tmp_path):
  """The config check runs first (coca_jax.train --dry_run here); a summary with an empty
  data.name stops the launch before gcloud or xpk is called. A named dataset goes on."""
  pod = ["--tpu", "t", "--zone", "z", "--config", "experiments/coca_base.py", "--workdir",
         "gs://b/r", "--create", "--accelerator_type", "v5p-8"]
  gke = ["--cluster", "c", "--zone", "z", "--tpu_type", "v5p-8", "--workload", "w", "--config",
         "experiments/coca_base.py", "--workdir", "gs://b/r"]
  for script, args in (("tpu_pod.sh", pod), ("gke_xpk.sh", gke)):
    env = _fake_bin(tmp_path, "gcloud", "xpk", python_summary='{"data_name": ""}')
    result = _launch(script, *args, env=env)
    assert result.returncode == 2, (script, result.stderr)
    assert "config.data.name is empty" in result.stderr, result.stderr
    assert not (tmp_path / "ran").exists(), (tmp_path / "ran").read_text()
    env = _fake_bin(tmp_path, "gcloud", "xpk", python_summary='{"data_name": "pairs"}')
    result = _launch(script, *args, env=env)
    assert result.returncode == 0, (script, result.stderr)
    assert (tmp_path / "ran").read_text().split()[0] in ("gcloud", "xpk")
    (tmp_path / "ran").unlink()
  # A config the check rejects (its error printed by coca_jax.train) starts nothing either.
  env = _fake_bin(tmp_path, "gcloud")
  result = _launch("tpu_pod.sh", *pod, env=dict(env, PYTHON="false"))
  assert result.returncode == 2 and "nothing was created or started" in result.stderr
  assert not (tmp_path / "ran").exists()
