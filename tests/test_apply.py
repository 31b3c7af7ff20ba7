"""`coun-tune apply`: an exported config run on the user's own model, data and deletion request.

Each accepted case re-derives what apply reports from the models themselves (accuracy of the
input model and of the written model.pt on the retain / request / test samples, chosen by the
test's own indexing) and checks the written model loads into the user's class. Each bad input
is exit 2 with one line, and nothing written or logged. The end-to-end test runs a real search,
registers the knee model, loads it back through models:/NAME@knee and applies it to a request."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from PIL import Image

DIGITS_NORM = (0.3, 0.37)  # digits' normalisation: the default for 1-channel data under a digits config


@pytest.fixture
def cli(monkeypatch, capsys):
    """`coun_tune.cli.main` in this process: (exit code, stdout, stderr)."""
    from coun_tune.cli import main

    def run(args, cwd):
        monkeypatch.chdir(cwd)
        capsys.readouterr()
        code = main([str(a) for a in args])
        out, err = capsys.readouterr()
        return code, out, err

    return run


@pytest.fixture(scope="module")
def small_digits():
    """300 train / 90 test digits images, (N, 1, 8, 8) uint8."""
    from coun_tune.core.datasets import load_dataset

    d = load_dataset("digits")
    return d.train_x[:300], d.train_y[:300], d.test_x[:90], d.test_y[:90]


def _fit(
    model: torch.nn.Module, x: np.ndarray, y: np.ndarray, steps: int = 150, mean=DIGITS_NORM[0], std=DIGITS_NORM[1]
) -> torch.nn.Module:
    """The user's own training: full-batch Adam, no augmentation."""
    torch.manual_seed(0)
    xt, yt = (torch.from_numpy(x).float() / 255 - mean) / std, torch.from_numpy(y)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(model(xt), yt)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@torch.no_grad()
def _acc(model: torch.nn.Module, x: np.ndarray, y: np.ndarray, mean=(DIGITS_NORM[0],), std=(DIGITS_NORM[1],)) -> float:
    """Accuracy in percent, computed here independently of coun-tune's metrics."""
    model.eval()
    m, s = torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)
    pred = model((torch.from_numpy(x).float() / 255 - m) / s).argmax(1).numpy()
    return float(100.0 * np.mean(pred == y))


@pytest.fixture(scope="module")
def tiny_model(small_digits):
    import _apply_arch

    torch.manual_seed(0)
    return _fit(_apply_arch.tiny_net(10, 1), small_digits[0], small_digits[1])


def _config(
    path: Path,
    arch="small_cnn",
    epochs=1,
    method="coun",
    batch_size=64,
    header="abc123, trial t_0001 (MLflow run 0123abcd)",
    **extra,
) -> Path:
    doc = {
        "scenario": {"dataset": "digits", "forget": "random:0.1", "seed": 0, "arch": arch, "recipe": "tiny"},
        "method": method,
        "hparams": {"temperature": 0.1, "cl_weight": 1.0, "lr": 0.05, "epochs": epochs},
        "batch_size": batch_size,
        "seed": 0,
        **extra,
    }
    path.write_text(f"# exported by coun-tune from search run {header}\n" + yaml.safe_dump(doc, sort_keys=False))
    return path


def _request(path: Path, ids) -> Path:
    pq.write_table(pa.table({"index": pa.array(np.asarray(ids), type=pa.int64())}), path)
    return path


def _npz(path: Path, data, layout="nchw") -> Path:
    tx, ty, sx, sy = data
    if layout == "nhwc":
        tx, sx = tx.transpose(0, 2, 3, 1), sx.transpose(0, 2, 3, 1)
    np.savez(path, train_x=tx, train_y=ty, test_x=sx, test_y=sy)
    return path


def _check_report(metrics: dict, before_model, after_model, data, ids, **norm):
    """apply's before/after accuracies equal the ones computed here on the test's own split."""
    tx, ty, sx, sy = data
    keep = np.setdiff1d(np.arange(len(ty)), ids)
    for when, model in (("before", before_model), ("after", after_model)):
        got = metrics[when]
        assert got["forget_acc"] == pytest.approx(_acc(model, tx[ids], ty[ids], **norm), abs=1e-9), when
        assert got["retain_acc"] == pytest.approx(_acc(model, tx[keep], ty[keep], **norm), abs=1e-9), when
        assert got["test_acc"] == pytest.approx(_acc(model, sx, sy, **norm), abs=1e-9), when
        assert 0 <= got["mia_efficacy"] <= 100
    req = metrics["request"]
    assert req["num_forget"] == len(ids) and req["num_retain"] == len(keep) and req["num_test"] == len(sy)
    # sha256 of the sorted ids, little-endian int64: the file's order does not matter
    assert req["sha256"] == hashlib.sha256(np.sort(ids).astype("<i8").tobytes()).hexdigest()


def test_user_architecture_by_import_path(tmp_path, cli, small_digits, tiny_model):
    """--arch package.module:factory (tests/_apply_arch.py), an NPZ file in NHWC layout, logged to
    an MLflow store that holds the search's trial run (made here, with the metrics a search and
    a transfer check log): they are reported beside the result, and the unlearned model is
    registered and loads back through the registry with its import-path architecture."""
    import _apply_arch

    from coun_tune.tracking.mlflow_store import client_for
    from coun_tune.tracking.models import load_model_uri

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = client_for(uri)
    exp = client.create_experiment("calibration", artifact_location=(tmp_path / "artifacts").as_uri())
    parent = client.create_run(exp, tags={"coun_tune.role": "search"}).info.run_id
    trial = client.create_run(exp, tags={"mlflow.parentRunId": parent, "coun_tune.role": "trial"}).info.run_id
    for k, v in {
        "forget_gap": 1.25,
        "avg_gap": 0.8,
        "transfer_forget_gap_mean": 1.5,
        "transfer_forget_gap_std": 0.25,
    }.items():
        client.log_metric(trial, k, v)

    torch.save(tiny_model.state_dict(), tmp_path / "user.pt")
    ids = np.array([250, 3, 17, 120, 121, 5, 299, 64, 80, 81, 200, 150])  # unsorted on purpose
    picked = _config(tmp_path / "picked.yaml", epochs=2, header=f"{parent}, trial t_0001 (MLflow run {trial})")
    code, out, err = cli(
        [
            "apply",
            "--config",
            picked,
            "--model",
            "user.pt",
            "--arch",
            "_apply_arch:tiny_net",
            "--forget",
            f"ids:{_request(tmp_path / 'r.parquet', ids)}",
            "--data",
            _npz(tmp_path / "d.npz", small_digits, "nhwc"),
            "--layout",
            "nhwc",
            "--crop-padding",
            "1",
            "--no-flip",
            "--output",
            "out",
            "--tracking-uri",
            uri,
            "--register",
            "user-model",
        ],
        tmp_path,
    )
    assert code == 0, err
    after = _apply_arch.tiny_net(10, 1)
    after.load_state_dict(torch.load(tmp_path / "out" / "model.pt", weights_only=True))  # strict: the user's keys
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    _check_report(metrics, tiny_model, after, small_digits, np.sort(ids))
    assert not torch.equal(after.hidden.weight, tiny_model.hidden.weight)  # it trained
    assert metrics["after"]["epoch"] == 2 and metrics["config"]["hparams"]["epochs"] == 2
    assert metrics["config"]["scenario"]["arch"] == "_apply_arch:tiny_net"
    assert metrics["provenance"] == {"search_run_id": parent, "trial_id": "t_0001", "trial_run_id": trial}
    assert metrics["calibration"] == {"forget_gap": 1.25, "avg_gap": 0.8}
    assert metrics["transfer"] == {"transfer_forget_gap_mean": 1.5, "transfer_forget_gap_std": 0.25}
    assert "transfer_forget_gap_mean" in out and "before" in out and "after" in out

    run = client.get_run(metrics["mlflow"]["run_id"])
    assert run.info.experiment_id == exp and run.info.status == "FINISHED"  # beside the search it came from
    assert run.data.tags["coun_tune.search_run"] == parent and run.data.tags["coun_tune.trial_run"] == trial
    assert run.data.metrics["after_retain_acc"] == metrics["after"]["retain_acc"]
    version = client.get_model_version_by_alias("user-model", "unlearned")
    assert str(version.version) == "1" and version.run_id == run.info.run_id
    state, info = load_model_uri("models:/user-model@unlearned", uri)
    assert info["arch"] == "_apply_arch:tiny_net"
    assert state.keys() == after.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in after.state_dict().items())

    # the next request starts from the registry: the architecture comes from the model, no --arch
    ids2 = np.array([10, 11, 290])
    code, out, err = cli(
        [
            "apply",
            "--config",
            picked,
            "--model",
            "models:/user-model@unlearned",
            "--forget",
            f"ids:{_request(tmp_path / 'r2.parquet', ids2)}",
            "--data",
            "d.npz",
            "--layout",
            "nhwc",
            "--crop-padding",
            "1",
            "--no-flip",
            "--output",
            "out2",
            "--tracking-uri",
            uri,
        ],
        tmp_path,
    )
    assert code == 0, err
    second = json.loads((tmp_path / "out2" / "metrics.json").read_text())
    tx, ty = small_digits[0], small_digits[1]
    assert second["before"]["forget_acc"] == pytest.approx(_acc(after, tx[ids2], ty[ids2]), abs=1e-9)
    assert second["model"] == {"source": "models:/user-model@unlearned", "arch": "_apply_arch:tiny_net"}
    assert str(client.get_model_version_by_alias("user-model", "unlearned").version) == "2"


def test_image_folder_dataset(tmp_path, cli, small_digits):
    """PNG files written here (class folders named, not numbered); a coun-tune small_cnn state
    dict, the architecture taken from the config. Sample i is the i-th file in (sorted class
    name, file name) order: the request names samples by that order."""
    from coun_tune.core.models import build_model

    tx, ty, sx, sy = small_digits
    names = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    order = sorted(names)  # the label the folder gets: its rank among the sorted names
    listing = {}
    for split, x, y in (("train", tx[:120], ty[:120]), ("test", sx, sy)):
        rows = []
        for i, (img, label) in enumerate(zip(x, y)):
            folder = tmp_path / "imgs" / split / names[label]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img[0], mode="L").save(folder / f"img_{i:04d}.png")
            rows.append((names[label], f"img_{i:04d}.png", img, order.index(names[label])))
        rows.sort(key=lambda r: (r[0], r[1]))
        listing[split] = (np.stack([r[2] for r in rows]), np.array([r[3] for r in rows]))
    data = (*listing["train"], *listing["test"])
    # the user's model: trained on the folder's own labels, saved as a state dict
    torch.manual_seed(0)
    model = _fit(build_model("small_cnn", 1, 10), data[0], data[1], steps=60)
    torch.save(model.state_dict(), tmp_path / "model.pt")
    ids = np.array([0, 7, 30, 31, 64, 90, 119])
    # the augmentation declared in the config's data: section this time, not by flags
    picked = _config(tmp_path / "picked.yaml", batch_size=32, data={"crop_padding": 1, "flip": False})
    code, out, err = cli(
        [
            "apply",
            "--config",
            picked,
            "--model",
            "model.pt",
            "--forget",
            f"ids:{_request(tmp_path / 'r.parquet', ids)}",
            "--data",
            "imgs",
            "--output",
            "out",
        ],
        tmp_path,
    )
    assert code == 0, err
    after = build_model("small_cnn", 1, 10)
    after.load_state_dict(torch.load(tmp_path / "out" / "model.pt", weights_only=True))
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["data"]["classes"] == order and metrics["data"]["format"] == "image_folder"
    assert metrics["config"]["data"] == {
        "crop_padding": 1,
        "flip": False,
        "mean": [DIGITS_NORM[0]],
        "std": [DIGITS_NORM[1]],
        "num_classes": 10,
    }
    _check_report(metrics, model, after, data, ids)


def test_torchvision_resnet18_state_dict(tmp_path, cli):
    """A plain torchvision classifier: its last Linear (fc) is the classifier, the rest features;
    RGB data as Parquet tensors (NHWC); the written state dict loads into torchvision's class."""
    import torchvision

    rng = np.random.default_rng(0)
    y = np.arange(48) % 4
    x = rng.integers(0, 90, (48, 3, 16, 16), dtype=np.uint8)
    x[np.arange(48), y % 3] += 120  # class k lights up channel k % 3, class 3 also its top rows
    x[y == 3, :, :4] = 250
    torch.manual_seed(0)
    mean, std = (0.3, 0.3, 0.3), (0.3, 0.3, 0.3)
    net = torchvision.models.resnet18(num_classes=4)
    _fit(net, x[:36], y[:36], steps=8, mean=torch.tensor(mean).view(1, 3, 1, 1), std=0.3)
    torch.save(net.state_dict(), tmp_path / "rn18.pt")
    tensors = pa.FixedShapeTensorArray.from_numpy_ndarray(np.ascontiguousarray(x.transpose(0, 2, 3, 1)))
    table = pa.table({"image": tensors, "label": y, "split": ["train"] * 36 + ["test"] * 12})
    pq.write_table(table, tmp_path / "d.parquet")
    ids = np.array([1, 2, 20, 33])
    code, out, err = cli(
        [
            "apply",
            "--config",
            _config(tmp_path / "p.yaml", batch_size=16, method="ft"),
            "--model",
            "rn18.pt",
            "--arch",
            "torchvision.models:resnet18",
            "--forget",
            f"ids:{_request(tmp_path / 'r.parquet', ids)}",
            "--data",
            "d.parquet",
            "--layout",
            "nhwc",
            "--crop-padding",
            "2",
            "--flip",
            "--mean",
            "0.3,0.3,0.3",
            "--std",
            "0.3,0.3,0.3",
            "--output",
            "out",
        ],
        tmp_path,
    )
    assert code == 0, err
    after = torchvision.models.resnet18(num_classes=4)
    after.load_state_dict(torch.load(tmp_path / "out" / "model.pt", weights_only=True))
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    _check_report(metrics, net, after, (x[:36], y[:36], x[36:], y[36:]), ids, mean=mean, std=std)
    assert not torch.equal(after.layer1[0].conv1.weight, net.layer1[0].conv1.weight)
    assert metrics["config"]["data"] == {
        "crop_padding": 2,
        "flip": True,
        "mean": list(mean),
        "std": list(std),
        "num_classes": 4,
    }


# --- bad input: one line, exit 2, nothing written or logged -------------------------------------------


def _bad_setup(tmp_path: Path, case: str, small_digits, tiny_model) -> list:
    from coun_tune.core.models import build_model

    torch.save(tiny_model.state_dict(), tmp_path / "user.pt")
    torch.save(build_model("small_cnn", 1, 10).state_dict(), tmp_path / "cnn.pt")
    data = _npz(tmp_path / "d.npz", small_digits)
    args = {
        "--config": _config(tmp_path / "picked.yaml"),
        "--model": "user.pt",
        "--arch": "_apply_arch:tiny_net",
        "--forget": f"ids:{_request(tmp_path / 'r.parquet', [1, 2, 3])}",
        "--data": data,
        "--layout": "nchw",
        "--crop-padding": "1",
        "--no-flip": None,
    }
    if case == "shapes":  # a small_cnn with 5 classes, data with 10
        torch.save(build_model("small_cnn", 1, 5).state_dict(), tmp_path / "cnn5.pt")
        args.update({"--model": "cnn5.pt", "--arch": "small_cnn"})
    elif case == "wrong_arch":  # small_cnn weights for the user's architecture
        args["--model"] = "cnn.pt"
    elif case == "ids_outside":
        args["--forget"] = f"ids:{_request(tmp_path / 'r2.parquet', [5, 300])}"
    elif case == "ids_duplicate":
        args["--forget"] = f"ids:{_request(tmp_path / 'r2.parquet', [5, 5])}"
    elif case == "factory_import":
        args["--arch"] = "no_such_package.models:net"
    elif case == "factory_attr":
        args["--arch"] = "_apply_arch:no_such_factory"
    elif case == "image_size":  # 10x10 images for a model built for 8x8
        tx, ty, sx, sy = small_digits
        pad = lambda a: np.pad(a, ((0, 0), (0, 0), (1, 1), (1, 1)))  # noqa: E731
        args["--data"] = _npz(tmp_path / "d10.npz", (pad(tx), ty, pad(sx), sy))
    elif case == "mixed_sizes":
        for split, side in (("train", 8), ("test", 9)):
            (tmp_path / "imgs" / split / "a").mkdir(parents=True)
            Image.fromarray(np.zeros((side, side), np.uint8), mode="L").save(tmp_path / "imgs" / split / "a" / "x.png")
        args["--data"] = "imgs"
    elif case == "corrupt_model":
        (tmp_path / "bad.pt").write_bytes((tmp_path / "user.pt").read_bytes()[:200])
        args["--model"] = "bad.pt"
    elif case == "corrupt_request":
        (tmp_path / "bad.parquet").write_bytes(b"PAR1 truncated")
        args["--forget"] = "ids:bad.parquet"
    elif case == "corrupt_config":
        (tmp_path / "bad.yaml").write_text("scenario: [unclosed\n")
        args["--config"] = "bad.yaml"
    elif case == "missing_data":
        args["--data"] = "nowhere.npz"
    elif case == "missing_model":
        args["--model"] = "nowhere.pt"
    elif case == "not_ids":
        args["--forget"] = "random:0.1"
    elif case == "no_augmentation":
        del args["--crop-padding"], args["--no-flip"]
    elif case == "registry_model_not_found":
        args["--model"] = "models:/nothing@knee"
        (tmp_path / "empty.db").write_bytes(b"")
    out = []
    for k, v in args.items():
        out += [k] if v is None else [k, v]
    return out


BAD = {
    "shapes": "do not match small_cnn",
    "wrong_arch": "do not match _apply_arch:tiny_net",
    "ids_outside": "index 300 is out of range [0, 300)",
    "ids_duplicate": "duplicate indices",
    "factory_import": "cannot import 'no_such_package.models'",
    "factory_attr": "has no 'no_such_factory'",
    "image_size": "does not take (1, 10, 10)",
    "mixed_sizes": "train images are (1, 8, 8)",
    "corrupt_model": "is not a state dict torch.load(weights_only=True) can read",
    "corrupt_request": "not a readable Parquet file",
    "corrupt_config": "is not valid YAML",
    "missing_data": "does not exist",
    "missing_model": "does not exist",
    "not_ids": "a real request is ids:",
    "no_augmentation": "declare the augmentation",
    "registry_model_not_found": "not found",
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_exits_2_with_nothing_written(tmp_path, cli, small_digits, tiny_model, case):
    args = _bad_setup(tmp_path, case, small_digits, tiny_model)
    db = tmp_path / "mlflow.db"
    if case == "registry_model_not_found":  # an MLflow store that exists but lacks the model
        from coun_tune.tracking.mlflow_store import client_for

        db.unlink(missing_ok=True)
        client_for(f"sqlite:///{db}").search_experiments()
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    code, out, err = cli(
        ["apply", *args, "--output", "out", "--tracking-uri", f"sqlite:///{db}", "--register", "m"], tmp_path
    )
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and BAD[case] in lines[0], err
    assert not (tmp_path / "out").exists()
    after = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    assert after == before  # no MLflow store created or touched, no file written anywhere


# --- the whole path: search -> export -> registry -> apply ---------------------------------------------


def _registered_knee(client, picked: Path) -> tuple[str, str]:
    """(registered name, the knee trial's run id), from the header `coun-tune export` writes:
    `(MLflow run ID)` and `# model_uri: models:/NAME/VERSION`."""
    text = picked.read_text()
    trial_run = text.split("(MLflow run ", 1)[1].split(")", 1)[0]
    recorded = [w for w in text.split() if w.startswith("models:/")]
    assert recorded, f"export recorded no registered model:\n{text}"
    return recorded[0][len("models:/") :].split("@")[0].split("/")[0], trial_run


@pytest.mark.slow
def test_search_export_register_knee_then_apply_from_registry(tmp_path, cli):
    import mlflow.pytorch
    from _search_helpers import run_cli, write_spec

    from coun_tune.core.datasets import load_dataset
    from coun_tune.core.models import build_model
    from coun_tune.tracking.mlflow_store import client_for, find_parent_run
    from coun_tune.tracking.models import load_model_uri

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    spec = write_spec(
        tmp_path / "spec.yaml",
        "apply_e2e",
        cache_dir=tmp_path / "cache",
        storage_path=tmp_path / "results",
        tracking_uri=uri,
        num_samples=2,
        max_concurrent_trials=2,
    )
    run_cli(["search", str(spec)], cwd=tmp_path, timeout=600)
    run_cli(["export", "apply_e2e", "--pick", "knee", "--output", "picked.yaml", "--tracking-uri", uri], cwd=tmp_path)
    client = client_for(uri)
    name, trial_run = _registered_knee(client, tmp_path / "picked.yaml")
    knee_version = client.get_model_version_by_alias(name, "knee")
    assert knee_version.run_id == trial_run

    # the knee model, read independently of coun-tune's loader: MLflow's PyTorch flavor
    knee = mlflow.pytorch.load_model(knee_version.source)
    d = load_dataset("digits")
    data = (d.train_x, d.train_y, d.test_x, d.test_y)
    ids = np.random.default_rng(7).choice(len(d.train_y), 40, replace=False)
    code, out, err = cli(
        [
            "apply",
            "--config",
            "picked.yaml",
            "--model",
            f"models:/{name}@knee",
            "--forget",
            f"ids:{_request(tmp_path / 'request.parquet', ids)}",
            "--data",
            _npz(tmp_path / "digits.npz", data),
            "--layout",
            "nchw",
            "--crop-padding",
            "1",
            "--no-flip",
            "--output",
            "applied",
            "--tracking-uri",
            uri,
        ],
        tmp_path,
    )
    assert code == 0, err
    metrics = json.loads((tmp_path / "applied" / "metrics.json").read_text())
    after = build_model("small_cnn", 1, 10)
    after.load_state_dict(torch.load(tmp_path / "applied" / "model.pt", weights_only=True))
    _check_report(metrics, knee, after, data, np.sort(ids))

    # beside them: what the search measured for this trial against its oracle
    trial = client.get_run(trial_run)
    assert metrics["calibration"]["forget_gap"] == pytest.approx(trial.data.metrics["forget_gap"])
    assert "forget_gap" in out

    # the run: provenance, request hash, FINISHED; the registry: a new version of the same name
    parent = find_parent_run(client, "apply_e2e")
    run = client.get_run(metrics["mlflow"]["run_id"])
    tags = run.data.tags
    assert run.info.status == "FINISHED" and tags["coun_tune.role"] == "apply"
    assert tags["coun_tune.search_run"] == parent.info.run_id and tags["coun_tune.trial_run"] == trial_run
    assert tags["coun_tune.request_sha256"] == hashlib.sha256(np.sort(ids).astype("<i8").tobytes()).hexdigest()
    exported = yaml.safe_load((tmp_path / "picked.yaml").read_text())
    assert {k: float(v) for k, v in exported["hparams"].items()} == {
        k[3:]: float(v) for k, v in run.data.params.items() if k.startswith("hp.")
    }
    new = client.get_model_version_by_alias(name, "unlearned")
    assert int(new.version) == int(knee_version.version) + 1 and new.run_id == run.info.run_id
    assert metrics["mlflow"]["registered_uri"] == f"models:/{name}/{new.version}"
    # and it loads back for the next request: the same weights as the written model.pt, and the
    # MLflow PyTorch model computes the same logits
    state, info = load_model_uri(f"models:/{name}@unlearned", uri)
    assert info["arch"] == "small_cnn"
    assert all(torch.equal(state[k], v) for k, v in after.state_dict().items())
    served = mlflow.pytorch.load_model(new.source).eval()
    x = (torch.from_numpy(d.test_x[:16]).float() / 255 - DIGITS_NORM[0]) / DIGITS_NORM[1]
    with torch.no_grad():
        torch.testing.assert_close(served(x), after.eval()(x))


# --- configs apply must refuse, through the real CLI (a fresh process) --------------------------------
# Each case is otherwise a valid run (small_cnn weights, digits data, a request, an MLflow store):
# without the check, apply would unlearn with the method's default hyperparameters (or fail only
# in MLflow, after writing its outputs) and write out/.


def _real_cli_setup(tmp_path: Path, small_digits) -> list:
    from coun_tune.core.models import build_model

    torch.save(build_model("small_cnn", 1, 10).state_dict(), tmp_path / "cnn.pt")
    return [
        "apply",
        "--model",
        "cnn.pt",
        "--arch",
        "small_cnn",
        "--forget",
        f"ids:{_request(tmp_path / 'r.parquet', [1, 2, 3]).name}",
        "--data",
        _npz(tmp_path / "d.npz", small_digits).name,
        "--layout",
        "nchw",
        "--crop-padding",
        "1",
        "--no-flip",
        "--output",
        "out",
        "--threads",
        "1",
    ]


def _write_doc(path: Path, doc: dict) -> Path:
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


EXPORTED = {
    "scenario": {"dataset": "digits", "forget": "random:0.1", "seed": 0, "arch": "small_cnn", "recipe": "tiny"},
    "method": "coun",
    "hparams": {"temperature": 0.1, "cl_weight": 1.0, "lr": 0.05, "epochs": 1},
    "seed": 0,
}
SEARCH_SPEC = {
    "name": "not_a_config",
    "scenario": {"dataset": "digits", "forget": "random:0.1", "seed": 0, "recipe": "tiny"},
    "method": "coun",
    "space": {"lr": {"log": [0.01, 0.1]}, "epochs": 1},
    "num_samples": 2,
}
BAD_CONFIGS = {
    "no_hparams": ({k: v for k, v in EXPORTED.items() if k != "hparams"}, "has no 'hparams'"),
    "no_method": ({k: v for k, v in EXPORTED.items() if k != "method"}, "has no 'method'"),
    "hparams_misspelt": (
        {**{k: v for k, v in EXPORTED.items() if k != "hparams"}, "hparam": EXPORTED["hparams"]},
        "unknown key 'hparam' in config 'bad.yaml'; did you mean 'hparams'?",
    ),
    "search_spec": (SEARCH_SPEC, "is a search spec (it has 'name')"),
    "empty_hparams": ({**EXPORTED, "hparams": {}}, "hparams must be a mapping of hyperparameters"),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_apply_refuses_a_config_that_is_not_a_picked_config(tmp_path, small_digits, case):
    from _search_helpers import child_env, run_cli

    args = _real_cli_setup(tmp_path, small_digits)
    doc, needle = BAD_CONFIGS[case]
    _write_doc(tmp_path / "bad.yaml", doc)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    proc = run_cli(
        [*args, "--config", "bad.yaml", "--tracking-uri", uri, "--register", "m"],
        cwd=tmp_path,
        env=child_env(COUN_TUNE_CACHE=str(tmp_path / "cc")),
        timeout=180,
        expect_rc=2,
    )
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("coun-tune: error: ") and needle in lines[0], proc.stderr
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == before  # no out/, no mlflow.db, nothing


@pytest.mark.parametrize("alias", ["Latest", "v3", "a/b"])  # every rule: test_alias_check_agrees_with_mlflow
def test_apply_refuses_an_alias_mlflow_reserves_or_rejects_before_writing(tmp_path, small_digits, alias):
    from _search_helpers import child_env, run_cli

    args = _real_cli_setup(tmp_path, small_digits)
    _write_doc(tmp_path / "picked.yaml", EXPORTED)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    proc = run_cli(
        [*args, "--config", "picked.yaml", "--tracking-uri", uri, "--register", "m", "--alias", alias],
        cwd=tmp_path,
        env=child_env(COUN_TUNE_CACHE=str(tmp_path / "cc")),
        timeout=180,
        expect_rc=2,
    )
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and f"--alias {alias!r}" in lines[0], proc.stderr
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == before


@pytest.mark.parametrize(
    "alias", ["latest", "LaTeSt", "v1", "V007", "ok", "knee", "best_retain_acc", "7up", "-x", "a b", "a.b", ""]
)
def test_alias_check_agrees_with_mlflow(alias):
    """coun-tune's early check refuses exactly what MLflow's registry would refuse later."""
    from mlflow.exceptions import MlflowException
    from mlflow.utils.validation import _validate_model_alias_name, _validate_model_alias_name_reserved

    from coun_tune.cli_apply import check_alias
    from coun_tune.errors import UsageError

    try:
        _validate_model_alias_name(alias)
        _validate_model_alias_name_reserved(alias)
        mlflow_ok = True
    except MlflowException:
        mlflow_ok = False
    try:
        check_alias(alias)
        ours_ok = True
    except UsageError:
        ours_ok = False
    assert ours_ok == mlflow_ok, alias
