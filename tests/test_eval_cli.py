"""`vlp eval` from the command line: reports, bad input, model forms, compare, several ranks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_eval_support import TINY, export_tiny, noise, save, tiny_model, write_suite

from vlp.app.cli import main

REPO = Path(__file__).resolve().parents[1]
TOP_KEYS = {"schema_version", "created", "suite", "model", "run", "summary", "tasks"}
TASK_KEYS = {
    "type",
    "dataset",
    "metrics",
    "main_metric",
    "n_items",
    "n_scored",
    "n_skipped",
    "skip_reasons",
    "skipped",
    "details",
    "seconds",
}
MODEL_LOADED = "No pretrained weights loaded"  # open_clip logs this when it builds a random model

SMALL_SYNTHETIC = [
    {
        "name": "shapes",
        "type": "zeroshot_classification",
        "dataset": {"format": "synthetic", "attribute": "shape", "n": 3, "image_size": 32},
        "templates": ["a {c}."],
    },
    {
        "name": "colours",
        "type": "zeroshot_classification",
        "dataset": {"format": "synthetic", "attribute": "colour", "n": 2, "image_size": 32},
    },
    {
        "name": "retrieval",
        "type": "retrieval",
        "dataset": {"format": "synthetic", "n": 12, "image_size": 32},
        "qb_norm": {},
    },
    {
        "name": "counting",
        "type": "counting",
        "dataset": {"format": "synthetic", "n": 2, "max_count": 4, "image_size": 32},
    },
    {"name": "binding", "type": "sugarcrepe", "dataset": {"format": "synthetic", "n": 5, "image_size": 32}},
    {"name": "vgr", "type": "aro_relation", "dataset": {"format": "synthetic", "n": 5, "image_size": 32}},
    {
        "name": "vga",
        "type": "aro_attribution",
        "min_group_size": 1,
        "dataset": {"format": "synthetic", "n": 5, "image_size": 32},
    },
    {"name": "order", "type": "aro_order", "dataset": {"format": "synthetic", "n": 4, "image_size": 32}},
    {"name": "wino", "type": "winoground", "dataset": {"format": "synthetic", "n": 4, "image_size": 32}},
]


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    return export_tiny(tmp_path_factory.mktemp("model") / "tiny.safetensors", seed=0)


def run_cli(*args: str) -> int:
    return main(["eval", *map(str, args)])


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("vlp: error: ") and "\n" not in err, err
    return err


# ---------------------------------------------------------------------- the default suite, end to end


@pytest.mark.slow
def test_default_suite_end_to_end_with_random_tiny_model(tmp_path, capsys):
    out = tmp_path / "report"
    assert (
        run_cli(
            "--model", "vlp-tiny", "--random-init", "--out", out, "--cache-dir", tmp_path / "cache", "--quiet"
        )
        == 0
    )
    report = json.loads((out / "report.json").read_text())
    assert set(report) == TOP_KEYS
    expected = {
        "shape_zeroshot",
        "colour_zeroshot",
        "retrieval",
        "counting",
        "binding",
        "relation_order",
        "word_order",
        "winoground",
    }
    assert set(report["tasks"]) == expected
    for name, task in report["tasks"].items():
        assert set(task) == TASK_KEYS, name
        assert task["n_scored"] > 0 and task["n_skipped"] == 0 and task["n_items"] == task["n_scored"], name
        assert task["metrics"][task["main_metric"]] is not None
    t = report["tasks"]
    assert set(t["shape_zeroshot"]["metrics"]) == {"acc1", "acc5", "mean_per_class_recall"}
    assert {
        f"{d}_retrieval_recall@{k}{s}" for d in ("image", "text") for k in (1, 5, 10) for s in ("", "_qbnorm")
    } == set(t["retrieval"]["metrics"])
    assert set(t["counting"]["metrics"]) == {"acc1", "mean_absolute_deviation"}
    assert t["counting"]["details"]["confusion_matrix"]["labels"] == [1, 2, 3, 4, 5, 6]
    assert set(t["binding"]["metrics"]) == {"acc", "acc/swap_att", "acc/replace_rel"}
    assert set(t["winoground"]["metrics"]) == {"text_score", "image_score", "group_score"}
    assert t["shape_zeroshot"]["dataset"]["seed"] == 10_000_019
    assert report["model"]["random_init"] and report["model"]["name"] == "vlp-tiny"
    # every image and text encoded once: the counting captions repeat across items but are encoded once
    enc = report["run"]["encoding"]
    assert enc["images_failed"] == 0 and enc["text_cache_hits"] > 0
    html = (out / "report.html").read_text()
    assert html.count('src="data:image/png;base64,') >= 10
    assert "http://" not in html and "https://" not in html and "<script src" not in html and "<link" not in html
    assert "wrote" in capsys.readouterr().out


# ---------------------------------------------------------------------- bad input: one line, before any model


@pytest.mark.parametrize(
    ("suite_text", "message"),
    [
        (
            "tasks:\n  - {name: a, type: zeroshot, dataset: {format: synthetic, n: 2}}\n",
            "tasks[0] (a): unknown task type 'zeroshot' (known: zeroshot_classification, retrieval,",
        ),
        (
            "tasks:\n  - {name: a, type: counting, colour: red, dataset: {format: synthetic, n: 2}}\n",
            "tasks[0] (a): unknown key 'colour'",
        ),
        (
            "tasks:\n  - {name: a, type: counting, dataset: {format: synthetic, n: 2, bogus: 1}}\n",
            "unknown key 'dataset.bogus'",
        ),
        (
            "tasks:\n  - {name: a, type: counting, dataset: {format: countbench}}\n",
            "key 'dataset.path': Field required",
        ),
        (
            "tasks:\n  - {name: a, type: retrieval, dataset: {format: parquet, path: x}}\n",
            "does not match any of the expected tags",
        ),
        (
            "tasks:\n  - {name: a, type: zeroshot_classification, templates: ['no slot'], dataset: {format: synthetic, attribute: shape, n: 1}}\n",
            "class name slot",
        ),
        (
            "tasks:\n  - {name: a, type: counting, dataset: {format: synthetic, n: 1}}\n  - {name: a, type: counting, dataset: {format: synthetic, n: 1}}\n",
            "task name 'a' is used twice",
        ),
        ("tasks: [\n", "not valid YAML"),
        ("name: x\n", "key 'tasks': Field required"),
        ("tasks: []\nextra: 1\n", "unknown key 'extra'"),
    ],
)
def test_bad_suite_is_one_line_before_the_model(tmp_path, capsys, caplog, suite_text, message):
    suite = tmp_path / "suite.yaml"
    suite.write_text(suite_text)
    # the model does not exist either: the suite error must come first
    assert run_cli("--model", tmp_path / "nope.safetensors", "--suite", suite, "--out", tmp_path / "o") == 2
    assert message in one_line_error(capsys)
    assert MODEL_LOADED not in caplog.text and not (tmp_path / "o").exists()


def test_missing_benchmark_file_fails_before_the_model(tmp_path, capsys, caplog):
    suite = write_suite(
        tmp_path / "s.yaml",
        [
            {
                "name": "cb",
                "type": "counting",
                "dataset": {"format": "countbench", "path": str(tmp_path / "CountBench.json")},
            }
        ],
    )
    assert run_cli("--model", "vlp-tiny", "--random-init", "--suite", suite, "--out", tmp_path / "o") == 2
    assert "CountBench file not found" in one_line_error(capsys)
    assert MODEL_LOADED not in caplog.text


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "vlp-tiny"], "needs --weights FILE (or --random-init"),
        (["--model", "no-such-model", "--random-init"], "unknown model 'no-such-model'"),
        (["--model", "vlp-tiny", "--weights", "/nonexistent.pt"], "weights file not found"),
        (["--model", "vlp-tiny", "--random-init", "--only", "nope"], "--only: no task 'nope'"),
        (["--model", "vlp-tiny", "--random-init", "--suite", "/no/such/suite.yaml"], "suite file not found"),
    ],
)
def test_bad_model_arguments(tmp_path, capsys, args, message):
    assert run_cli(*args, "--out", tmp_path / "o") == 2
    assert message in one_line_error(capsys)


# ---------------------------------------------------------------------- a missing image is a counted skip


def test_missing_image_is_skipped_with_its_id(tmp_path, capsys, exported):
    coco, data = tmp_path / "val2017", tmp_path / "sugarcrepe"
    for i in range(3):
        save(noise(i), coco / f"{i:012d}.jpg", "JPEG")
    entries = {
        str(k): {
            "filename": f"{k % 4:012d}.jpg",
            "caption": f"a thing {k}",
            "negative_caption": f"thing a {k}",
        }
        for k in (0, 1, 3, 5)
    }
    data.mkdir()
    (data / "swap_att.json").write_text(
        json.dumps(entries)
    )  # key "3" names 000000000003.jpg, which is missing
    suite = write_suite(
        tmp_path / "s.yaml",
        [
            {
                "name": "sc",
                "type": "sugarcrepe",
                "dataset": {"format": "sugarcrepe", "path": str(data), "image_root": str(coco)},
            }
        ],
    )
    out = tmp_path / "out"
    assert run_cli("--model", exported, "--suite", suite, "--out", out, "--quiet") == 0
    task = json.loads((out / "report.json").read_text())["tasks"]["sc"]
    assert (task["n_items"], task["n_scored"], task["n_skipped"]) == (4, 3, 1)
    assert task["skip_reasons"] == {"missing_file": 1}
    assert task["skipped"][0]["id"] == "swap_att/3" and "000000000003.jpg" in task["skipped"][0]["detail"]
    lines = [json.loads(x) for x in (out / "skipped.jsonl").read_text().splitlines()]
    assert lines == [{"task": "sc", **task["skipped"][0]}]
    assert "item swap_att/3: missing_file" in capsys.readouterr().err
    assert "Skipped 1 of 4 items" in (out / "report.html").read_text()


# ---------------------------------------------------------------------- the three model forms load the same weights


def _text_features(args, tmp_path):
    from vlp.eval.encoders import load_encoder, resolve_model

    encoder, info = load_encoder(resolve_model(*args))
    return encoder.encode_texts(["two red circles", "a blue star"]), info


def test_model_forms_load_the_same_weights(tmp_path, exported):
    model, _, tok = tiny_model(seed=0)
    with torch.no_grad():
        expected = torch.nn.functional.normalize(
            model.encode_text(tok(["two red circles", "a blue star"])), dim=-1
        )
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "model.safetensors").write_bytes(exported.read_bytes())
    pt = tmp_path / "w.pt"
    torch.save(model.state_dict(), pt)
    from test_eval_support import register_tiny

    register_tiny()
    for args in ((str(exported),), (str(ckpt),), (TINY, str(pt))):
        feats, info = _text_features(args, tmp_path)
        assert torch.allclose(feats, expected, atol=1e-6), args
        assert not info["random_init"] and info["embed_dim"] == 32


def test_model_file_problems_are_one_line(tmp_path, capsys, exported):
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "nometa.safetensors"))
    bare = tmp_path / "bare.safetensors"
    save_file({"x": torch.zeros(1)}, str(bare), metadata={"vlp_model_name": "eval-test-never-registered"})
    (tmp_path / "empty_ckpt").mkdir()
    cases = [
        (tmp_path / "nometa.safetensors", "has no 'vlp_model_name' metadata"),
        (bare, "is unknown to open_clip and the file carries no config"),
        (tmp_path / "empty_ckpt", "no model.safetensors (expected a checkpoint, a run folder or a weights file)"),
    ]
    suite = write_suite(tmp_path / "s.yaml", SMALL_SYNTHETIC[:1])
    for model, message in cases:
        assert (
            run_cli(
                "--model", model, "--suite", suite, "--out", tmp_path / "o", "--cache-dir", tmp_path / "c"
            )
            == 2
        )
        assert message in one_line_error(capsys)
    assert (
        run_cli(
            "--model",
            "vlp-micro",
            "--weights",
            exported,
            "--suite",
            suite,
            "--out",
            tmp_path / "o",
            "--cache-dir",
            tmp_path / "c",
        )
        == 2
    )
    assert "do not fit model vlp-micro" in one_line_error(capsys)


# ---------------------------------------------------------------------- compare


def test_every_synthetic_task_and_compare(tmp_path, capsys, exported):
    suite = write_suite(tmp_path / "small.yaml", SMALL_SYNTHETIC)
    a, b = tmp_path / "a", tmp_path / "b"
    assert (
        run_cli(
            "--model", exported, "--suite", suite, "--out", a, "--cache-dir", tmp_path / "cache", "--quiet"
        )
        == 0
    )
    assert (
        run_cli(
            "--model",
            TINY,
            "--random-init",
            "--seed",
            1,
            "--suite",
            suite,
            "--out",
            b,
            "--cache-dir",
            tmp_path / "cache",
            "--quiet",
        )
        == 0
    )
    ra, rb = (json.loads((d / "report.json").read_text()) for d in (a, b))
    assert set(ra["tasks"]) == {t["name"] for t in SMALL_SYNTHETIC}
    assert all(t["n_skipped"] == 0 and t["n_scored"] > 0 for t in ra["tasks"].values())
    assert ra["tasks"]["vga"]["details"]["groups_counted"] > 0
    # the second run found every synthetic set in the cache: same files, same datasets
    assert ra["tasks"]["retrieval"]["dataset"] == rb["tasks"]["retrieval"]["dataset"]
    capsys.readouterr()

    assert run_cli("compare", a / "report.json", b, "--out", tmp_path / "cmp") == 0
    text = capsys.readouterr().out
    header, rule, *body = text.splitlines()[:-1]
    assert header.split()[:2] == ["task", "metric"] and header.split()[-1] == "delta"
    counting = next(line for line in body if line.startswith("counting") and " acc1 " in line)
    va, vb = ra["tasks"]["counting"]["metrics"]["acc1"], rb["tasks"]["counting"]["metrics"]["acc1"]
    assert counting.split()[2:] == [f"{va:.4f}", f"{vb:.4f}", f"{vb - va:+.4f}"]
    html = (tmp_path / "cmp" / "compare.html").read_text()
    assert "data:image/png;base64," in html and "http://" not in html
    assert run_cli("compare", a, tmp_path / "missing") == 2
    assert "report not found" in one_line_error(capsys)


# ---------------------------------------------------------------------- several ranks


@pytest.mark.slow
def test_two_ranks_give_the_single_process_report(tmp_path, exported):
    suite = write_suite(tmp_path / "small.yaml", SMALL_SYNTHETIC)
    common = [
        "--model",
        str(exported),
        "--suite",
        str(suite),
        "--cache-dir",
        str(tmp_path / "cache"),
        "--quiet",
        "--batch-size",
        "4",
    ]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    }
    single = subprocess.run(
        [sys.executable, "-m", "vlp", "eval", *common, "--out", str(tmp_path / "one")],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert single.returncode == 0, single.stderr[-2000:]
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(_free_port()),
    ]
    multi = subprocess.run(
        [*torchrun, "-m", "vlp", "eval", *common, "--out", str(tmp_path / "two")],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert multi.returncode == 0, multi.stderr[-3000:]
    one, two = (json.loads((tmp_path / d / "report.json").read_text()) for d in ("one", "two"))
    assert two["run"]["world_size"] == 2 and one["run"]["world_size"] == 1
    for name, task in one["tasks"].items():
        for key, value in task["metrics"].items():
            assert two["tasks"][name]["metrics"][key] == pytest.approx(value, abs=1e-6), (name, key)
        assert two["tasks"][name]["n_scored"] == task["n_scored"]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_retrieval_reports_both_dbnorm_variants_with_banks_from_files(exported, tmp_path):
    """DBNorm's two banks come from other pairs (files), never from the evaluated queries."""
    from test_eval_support import noise, save

    bank = tmp_path / "bank"
    for i in range(5):
        save(noise(100 + i), bank / f"{i}.png")
    (bank / "images.txt").write_text("".join(f"{i}.png\n" for i in range(5)))
    (bank / "texts.txt").write_text("a red circle\ntwo blue squares\na green star\nthree triangles\na square\n")
    suite = tmp_path / "suite.yaml"
    suite.write_text(json.dumps({"name": "db", "tasks": [{
        "name": "retrieval", "type": "retrieval", "dataset": {"format": "synthetic", "n": 12, "image_size": 32},
        "db_norm": {"banks": {"texts": str(bank / "texts.txt"), "images": str(bank / "images.txt")},
                    "beta_query": 10, "beta_gallery": 5}}]}))
    out = tmp_path / "report"
    assert run_cli("--model", exported, "--suite", suite, "--out", out, "--cache-dir", tmp_path / "cache",
                   "--quiet") == 0
    task = json.loads((out / "report.json").read_text())["tasks"]["retrieval"]
    names = set(task["metrics"])
    for suffix in ("", "_dbnorm", "_dbnorm_dynamic"):
        assert {f"{d}_retrieval_recall@1{suffix}" for d in ("image", "text")} <= names
    assert all(0 <= v <= 1 for v in task["metrics"].values())
    assert task["details"]["db_norm"] == {"beta_query": 10, "beta_gallery": 5, "k": 1, "bank_texts": 5,
                                          "bank_images": 5}


def test_retrieval_reports_the_validation_loss(tmp_path, exported):
    """`loss_batch_size` adds open_clip_train's validation loss: each image with its first caption, the model's
    own logit scale, batches of 4 (recomputed here from the dataset the suite wrote)."""
    from open_clip.loss import ClipLoss
    from vlp.eval.encoders import load_encoder, resolve_model

    suite = write_suite(tmp_path / "s.yaml", [{"name": "val", "type": "retrieval", "loss_batch_size": 4,
                                               "dataset": {"format": "synthetic", "n": 10, "image_size": 32}}])
    out = tmp_path / "o"
    assert run_cli("--model", exported, "--suite", suite, "--out", out, "--cache-dir", tmp_path / "c", "--quiet") == 0
    loss = json.loads((out / "report.json").read_text())["tasks"]["val"]["metrics"]["clip_val_loss"]
    data = next((tmp_path / "c").rglob("dataset_synthetic.json"))
    images = json.loads(data.read_text())["images"]
    encoder, _ = load_encoder(resolve_model(str(exported)))
    img = encoder.encode_images([data.parent / i["filepath"] / i["filename"] for i in images])
    txt = encoder.encode_texts([i["sentences"][0]["raw"] for i in images])
    scale = torch.tensor(encoder.logit_scale)
    want = sum(ClipLoss()(img[s:s + 4], txt[s:s + 4], scale).item() * len(img[s:s + 4]) for s in (0, 4, 8)) / 10
    assert loss == pytest.approx(want, rel=1e-5)
