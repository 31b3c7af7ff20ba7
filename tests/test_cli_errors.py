"""Bad input, through the real CLI: one line on stderr, exit code 2, nothing written or logged."""

import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

GOOD_SPEC = """\
name: bad_spec_test
scenario: {dataset: digits, forget: "random:0.1", seed: 0, recipe: tiny}
method: coun
space:
  temperature: {log: [0.03, 0.3]}
  lr: {log: [0.01, 0.1]}
  epochs: 1
sampler: nsga2
num_samples: 2
"""


def run_cli(args, cwd):
    """The real entry point in a fresh process: exit code and stderr as a user sees them."""
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "COUN_TUNE_CACHE": str(Path(cwd) / "cache")}
    return subprocess.run(
        [sys.executable, "-m", "coun_tune", *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=120
    )


@pytest.fixture
def cli(monkeypatch, capsys):
    """`coun_tune.cli.main` in this process (importing torch once, not once per case)."""
    from coun_tune.cli import main

    def run(args, cwd):
        monkeypatch.chdir(cwd)
        monkeypatch.setenv("COUN_TUNE_CACHE", str(Path(cwd) / "cache"))
        capsys.readouterr()
        rc = main(args)
        return subprocess.CompletedProcess(args, rc, *capsys.readouterr())

    return run


def assert_clean_failure(proc, cwd, needle):
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert needle in lines[0]
    leftovers = sorted(p.name for p in Path(cwd).iterdir() if p.name not in ("spec.yaml", "req.parquet"))
    assert leftovers == [], f"bad input wrote {leftovers}"


@pytest.mark.parametrize(
    "edit,needle",
    [
        (lambda s: s.replace("num_samples: 2", "num_sampels: 2"), "unknown key 'num_sampels'"),
        (lambda s: s.replace("sampler: nsga2", "sampler: annealing"), "unknown sampler 'annealing'"),
        (lambda s: s + "objectives: {forget_gap: min, happiness: max}\n", "objective 'happiness'"),
        (lambda s: s.replace("{log: [0.01, 0.1]}", "{log: [0.1, 0.01]}"), "space.lr: empty domain"),
        (lambda s: s.replace("epochs: 1", "epochs: {choice: []}"), "space.epochs: empty domain"),
        (lambda s: s.replace("  epochs: 1", "  momentum: 0.8"), "no hyperparameter 'momentum'"),
        (lambda s: s.replace("method: coun", "method: magic"), "unknown method 'magic'"),
        (lambda s: s.replace("random:0.1", "random:1.5"), "fraction must be in (0, 1)"),
        (lambda s: s + "objectives: {forget_gap: min}\n", "two or three"),
        (lambda s: s.replace("{log: [0.03, 0.3]}", "{log: [0.0, 0.3]}"), "log domain needs low > 0"),
        (lambda s: s + "tracking_uri: ./mlflow.db\n", "tracking_uri"),
        (lambda s: "name: [unclosed\n", "not valid YAML"),
        (lambda s: s.replace("sampler: nsga2", "sampler: nsga2\nsampler: tpe"), "key 'sampler' appears twice (line 9)"),
        (lambda s: s + "objectives: {forget_gap: min, forget_gap: max}\n", "key 'forget_gap' appears twice (line 10)"),
        (lambda s: s.replace("lr: {log: [0.01, 0.1]}", "lr: 0"), "space.lr: lr must be >"),
        (lambda s: s.replace("epochs: 1", "epochs: 0"), "space.epochs: epochs must be >= 1"),
        (lambda s: s + "storage_path: ftp://host/x\n", "storage_path 'ftp://host/x'"),
        (lambda s: s + "cache_dir: s3:///nobucket\n", "needs a bucket"),
        (lambda s: s + "storage_endpoint: 127.0.0.1:9000\n", "storage_endpoint"),
        (lambda s: s + "scheduler: {type: hyperband}\n", "scheduler must be {type: mo_asha"),
        (lambda s: s + "scheduler: {type: mo_asha, grace: 1}\n", "unknown key 'grace' in scheduler"),
        (
            lambda s: s + "scheduler: {type: mo_asha, reduction_factor: 1}\n",
            "scheduler.reduction_factor must be an integer >= 2",
        ),
        (
            lambda s: s + "scheduler: {type: mo_asha, grace_epochs: 0}\n",
            "scheduler.grace_epochs must be an integer >= 1",
        ),
    ],
)
def test_bad_search_spec(tmp_path, cli, edit, needle):
    (tmp_path / "spec.yaml").write_text(edit(GOOD_SPEC))
    assert_clean_failure(cli(["search", "spec.yaml"], tmp_path), tmp_path, needle)


def test_bad_spec_in_a_fresh_process(tmp_path):
    (tmp_path / "spec.yaml").write_text(GOOD_SPEC.replace("sampler: nsga2", "sampler: annealing"))
    assert_clean_failure(run_cli(["search", "spec.yaml"], tmp_path), tmp_path, "unknown sampler")


def test_missing_spec_file(tmp_path, cli):
    assert_clean_failure(cli(["search", "nope.yaml"], tmp_path), tmp_path, "does not exist")


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--dataset", "mnist"], "unknown dataset 'mnist'"),
        (["--method", "magic"], "unknown method 'magic'"),
        (["--temperature", "-0.1"], "temperature must be > 0"),
        (["--cl-weight", "-1"], "cl_weight must be >= 0"),
        (["--forget", "random:0"], "fraction must be in (0, 1)"),
        (["--forget", "random:1.0"], "fraction must be in (0, 1)"),
        (["--forget", "class:12"], "classes 0..9"),
        (["--forget", "sometimes"], "bad forget spec"),
        (["--forget", "ids:req.parquet"], "out of range"),
        (["--forget", "ids:missing.parquet"], "does not exist"),
        (["--dataset", "fashion_mnist", "--data-root", "no/such/dir"], "does not exist"),
        (["--epochs", "0"], "epochs must be >= 1"),
        (["--lr", "abc"], "invalid float value"),
        (["--config", "missing.yaml"], "does not exist"),
        (["--device", "cuda"], "no CUDA GPU"),
        (["--device", "banana"], "unknown device"),
        (["--arch", "vit_small"], "takes 32x32 images; digits has 8x8"),
        (["--recipe", "forever"], "unknown recipe"),
    ],
)
def test_bad_unlearn_input(tmp_path, cli, args, needle):
    pq.write_table(pa.table({"index": pa.array([0, 5, 99999], type=pa.int64())}), tmp_path / "req.parquet")
    proc = cli(["unlearn", *args, "--output", "out"], tmp_path)
    assert_clean_failure(proc, tmp_path, needle)


def test_bad_unlearn_input_in_a_fresh_process(tmp_path):
    proc = run_cli(["unlearn", "--temperature", "-0.1", "--output", "out"], tmp_path)
    assert_clean_failure(proc, tmp_path, "temperature must be > 0")


def test_duplicate_key_in_an_unlearn_config(tmp_path, cli):
    (tmp_path / "c.yaml").write_text("method: coun\nhparams: {lr: 0.05, epochs: 1, lr: 0.5}\n")
    proc = cli(["unlearn", "--config", "c.yaml", "--output", "out"], tmp_path)
    assert proc.returncode == 2 and "key 'lr' appears twice (line 2)" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml"]


def test_config_seed_is_read_and_flags_override_it():
    from coun_tune.config.unlearn_config import build_unlearn_config

    doc = {"scenario": {"dataset": "digits"}, "method": "coun", "seed": 7}
    assert build_unlearn_config(doc, {"unlearn_seed": None}).seed == 7
    assert build_unlearn_config(doc, {"unlearn_seed": 3}).seed == 3


def test_export_to_a_directory_is_refused(tmp_path, cli):
    (tmp_path / "mlflow.db").write_bytes(b"")
    (tmp_path / "outdir").mkdir()
    proc = cli(["export", "x", "--output", "outdir", "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"], tmp_path)
    assert proc.returncode == 2 and "is a directory" in proc.stderr


def test_unreachable_mlflow_server_fails_before_ray(tmp_path, cli):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (tmp_path / "spec.yaml").write_text(GOOD_SPEC)
    proc = cli(["search", "spec.yaml", "--tracking-uri", f"http://127.0.0.1:{port}"], tmp_path)
    assert_clean_failure(proc, tmp_path, "does not answer")


def test_gpu_trials_on_a_local_cpu_ray_fail_before_logging(tmp_path):
    (tmp_path / "spec.yaml").write_text(GOOD_SPEC + "resources_per_trial: {cpu: 1, gpu: 0.25}\n")
    assert_clean_failure(run_cli(["search", "spec.yaml"], tmp_path), tmp_path, "local Ray sees 0")


@pytest.mark.parametrize(
    "edit,needle",
    [
        (lambda s: s.replace("{log: [0.01, 0.1]}", "{uniform: [-1, 0.1]}"), "space.lr: lr must be >"),
        (lambda s: s.replace("epochs: 1", "epochs: {int: [0, 3]}"), "space.epochs: epochs must be >= 1"),
        (
            lambda s: s.replace("method: coun", "method: neggrad_plus").replace(
                "  epochs: 1", "  epochs: 1\n  neggrad_beta: {uniform: [0.9, 1.5]}"
            ),
            "neggrad_beta must be in [0, 1]",
        ),
    ],
)
def test_space_corners_are_checked_before_anything_starts(tmp_path, cli, edit, needle):
    (tmp_path / "spec.yaml").write_text(edit(GOOD_SPEC))
    assert_clean_failure(cli(["search", "spec.yaml"], tmp_path), tmp_path, needle)
