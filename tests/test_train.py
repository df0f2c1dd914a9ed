"""`vlp train` for real: DeepSpeed engines in several processes on CPU (gloo), every launcher.

Each test starts the real command-line program the way a user would (torchrun,
the DeepSpeed launcher, accelerate launch) on a tiny model (vlp-micro) and a
small synthetic shard set, then reads metrics.jsonl and the checkpoints.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
import yaml
from vlp.data_tools.build import build_shards
from vlp.data_tools.synth import generate

from vlp.core.config import ShardsBuildConfig
from vlp.core.distributed import find_free_port

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[1]
STEPS = 8


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("train")
    csv_path = generate(root / "synth", n=640, seed=11, image_size=32, progress=False)
    opts = ShardsBuildConfig(inputs=[str(csv_path)], output=str(root / "shards"), image_size=32,
                             keep_cols=["hard_negatives"], shard_size=100, workers=0)
    build_shards(opts, progress=False)
    return root / "shards"


def _overrides(shards: Path, out: Path, *extra: str) -> list[str]:
    return [
        f"data.sources=[{{shards: '{shards}'}}]", "data.workers=1", "data.shuffle_buffer=64",
        "model.name=vlp-micro", "train.batch_size=16", f"train.steps={STEPS}", "optim.lr=2e-3",
        "optim.warmup_steps=2", "train.checkpoint_every=4", f"train.output_dir={out}", "train.log_keys=true",
        *extra,
    ]


def _env() -> dict:
    # BIN first on PATH: `vlp launch` starts torchrun / deepspeed by name, as a user's shell would.
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PATH=f"{BIN}:{os.environ['PATH']}")
    env.pop("RANK", None)
    return env


def _run(cmd: list[str], timeout: float = 600, cwd: Path | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env(), cwd=cwd)
    assert proc.returncode == 0, f"{cmd[0]} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _torchrun(nproc: int, overrides: list[str], *extra: str) -> list[str]:
    return [str(BIN / "torchrun"), f"--nproc_per_node={nproc}", f"--master_port={find_free_port()}", *extra,
            "-m", "vlp", "train", *overrides]


def _assert_trained(out: Path, world: int) -> list[dict]:
    lines = _metrics(out)
    assert [m["step"] for m in lines] == list(range(1, STEPS + 1))
    assert all(len(m["keys"]) == 16 * world for m in lines)  # the global batch, every rank's keys
    assert all(len(set(m["keys"])) == 16 * world for m in lines)  # ranks read different samples
    assert lines[-1]["samples"] == STEPS * 16 * world
    assert (out / "checkpoints" / "step_00000008" / "vlp_state.json").is_file()
    return lines


def test_torchrun_two_ranks_zero1_loss_falls(shards, tmp_path):
    out = tmp_path / "run"
    _run(_torchrun(2, _overrides(shards, out, "train.zero_stage=1", f"train.steps={6 * STEPS}")))
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in lines]
    assert len(losses) == 6 * STEPS
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < first - 0.2 and last < math.log(32) - 0.1, (first, last)  # it learns: below chance (2 x 16)
    assert all(m["peak_memory_mb"] > 0 and m["samples_per_s"] > 0 for m in lines)
    assert {"lr", "logit_scale", "skipped_samples", "contrastive"} <= set(lines[0])


def test_two_nodes_static_rendezvous_zero2(shards, tmp_path):
    """`vlp launch` on each of two "nodes" on localhost: two torchrun processes, one rank each."""
    out = tmp_path / "run"
    launch = ["launch.launcher=torchrun", "launch.nodes=2", "launch.procs_per_node=1", "launch.master_addr=127.0.0.1",
              f"launch.master_port={find_free_port()}"]
    args = _overrides(shards, out, "train.zero_stage=2")
    nodes = [subprocess.Popen([str(BIN / "vlp"), "launch", *launch, f"launch.node_rank={r}", *args],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env()) for r in range(2)]
    for node in nodes:
        stdout, stderr = node.communicate(timeout=600)
        assert node.returncode == 0, stderr[-5000:]
    _assert_trained(out, world=2)


def test_deepspeed_launcher_no_ssh(shards, tmp_path):
    out = tmp_path / "run"
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    # through `vlp launch`, which checks the hostfile against the config before DeepSpeed starts
    _run([str(BIN / "vlp"), "launch", "launch.launcher=deepspeed", f"launch.hostfile={hostfile}",
          "launch.procs_per_node=2", f"launch.master_port={find_free_port()}",
          *_overrides(shards, out, "train.zero_stage=2")])
    _assert_trained(out, world=2)


@pytest.mark.parametrize("form", ["inline", "shipped"])
def test_accelerate_launch_with_deepspeed_plugin(shards, tmp_path, form):
    """accelerate's own DeepSpeed settings (inline, or launch/'s file naming ds_zero2.json) are applied."""
    out = tmp_path / "run"
    config = REPO / "launch" / "accelerate_deepspeed.yaml"
    if form == "inline":
        config = tmp_path / "accelerate.yaml"
        config.write_text(
            "compute_environment: LOCAL_MACHINE\ndistributed_type: DEEPSPEED\n"
            "deepspeed_config:\n  zero_stage: 2\n  gradient_clipping: 0.5\n  offload_optimizer_device: none\n"
            "  offload_param_device: none\n  zero3_init_flag: false\n"
            "machine_rank: 0\nmain_process_ip: 127.0.0.1\nnum_machines: 1\nnum_processes: 2\n"
            "mixed_precision: 'no'\nrdzv_backend: static\nsame_network: true\nuse_cpu: false\n"
        )
    _run([str(BIN / "accelerate"), "launch", "--config_file", str(config), f"--main_process_port={find_free_port()}",
          "-m", "vlp", "train", *_overrides(shards, out, "train.zero_stage=0")], cwd=REPO)
    _assert_trained(out, world=2)
    # the plugin's ZeRO-2 won over the run config's zero_stage=0: partitioned optimizer states
    ckpt = out / "checkpoints" / "step_00000008"
    assert sorted(p.name for p in ckpt.iterdir() if "zero_pp_rank" in p.name) == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]


def _wait_for_steps(out: Path, n: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    end = time.monotonic() + timeout
    while True:
        path = out / "metrics.jsonl"
        if path.exists() and len(path.read_text().splitlines()) >= n:
            return
        assert proc.poll() is None, proc.stderr.read()[-5000:]
        assert time.monotonic() < end, "training did not reach the step in time"
        time.sleep(0.2)


def _kill_9_tree(pid: int) -> None:
    """SIGKILL torchrun and every rank, and wait until all are gone.

    torchrun starts its workers in sessions of their own, so killing its
    process group would leave the ranks training on.
    """
    parent = psutil.Process(pid)
    procs = [parent, *parent.children(recursive=True)]
    for p in procs:
        p.kill()
    _, alive = psutil.wait_procs(procs, timeout=30)
    assert not alive, alive


def test_kill_9_then_resume_reproduces_the_key_sequence(shards, tmp_path):
    reference = tmp_path / "reference"
    _run(_torchrun(2, _overrides(shards, reference, "train.checkpoint_every=2")))
    want = _metrics(reference)

    out = tmp_path / "killed"
    cmd = _torchrun(2, _overrides(shards, out, "train.checkpoint_every=2"))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    _wait_for_steps(out, 5, proc)
    _kill_9_tree(proc.pid)  # no chance to save anything
    proc.wait()
    killed_at = len(_metrics(out))  # the ranks may still finish a line as they die: a lower bound
    assert killed_at >= 5

    resumed = _run(cmd[:-len(_overrides(shards, out))] + _overrides(shards, out, "train.checkpoint_every=2",
                                                                     "train.resume=auto"))
    resumed_from = int(re.search(r"resumed from .* \(step (\d+)\)", resumed.stderr).group(1))
    assert resumed_from in (4, 6) and resumed_from <= killed_at  # the newest complete checkpoint
    got = _metrics(out)  # the steps logged after that checkpoint were redone and replaced
    assert [m["step"] for m in got] == list(range(1, STEPS + 1))
    for w, g in zip(want, got, strict=True):
        assert g["keys"] == w["keys"], w["step"]
        assert g["loss"] == pytest.approx(w["loss"], rel=1e-4, abs=1e-5), w["step"]


def test_sigterm_saves_a_loadable_checkpoint_and_exits_cleanly(shards, tmp_path):
    out = tmp_path / "run"
    cmd = _torchrun(2, _overrides(shards, out, "train.steps=1000", "train.checkpoint_every=1000"))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    _wait_for_steps(out, 3, proc)
    proc.send_signal(signal.SIGTERM)  # torchrun forwards it to both ranks
    _, stderr = proc.communicate(timeout=300)
    assert "stopped by signal" in stderr
    steps = len(_metrics(out))
    ckpts = sorted((out / "checkpoints").glob("step_*"))
    assert [c.name for c in ckpts] == [f"step_{steps:08d}"]
    state = json.loads((ckpts[0] / "vlp_state.json").read_text())
    assert state["step"] == steps and state["samples"] == steps * 32
    # loadable: resume from it and take one more step
    _run(_torchrun(2, _overrides(shards, out, f"train.steps={steps + 1}", "train.resume=auto")))
    assert _metrics(out)[-1]["step"] == steps + 1


def test_shipped_offload_json_trains_with_deepspeed_cpu_adam(shards, tmp_path):
    """launch/ds_zero2_offload.json as shipped: DeepSpeed's CPU Adam, the same steps as torch's AdamW.

    Run outside the checkout, so the path resolves to the copy shipped in the package. The first
    run on a machine compiles CPU Adam (minutes on 2 cores; cached in ~/.cache/torch_extensions).
    """
    offload, reference = tmp_path / "offload", tmp_path / "reference"
    done = _run([sys.executable, "-m", "vlp", "train", *_overrides(shards, offload, "train.steps=4"),
                 "train.deepspeed_config=launch/ds_zero2_offload.json"], timeout=900, cwd=tmp_path)
    assert "optimizer states offloaded: DeepSpeedCPUAdam" in done.stderr
    _run([sys.executable, "-m", "vlp", "train", *_overrides(shards, reference, "train.steps=4", "train.zero_stage=2")])
    ours, torch_adamw = _metrics(offload), _metrics(reference)
    assert [m["keys"] for m in ours] == [m["keys"] for m in torch_adamw]
    # same schedule, betas, eps and weight-decay groups: the losses agree to float rounding
    assert [m["loss"] for m in ours] == pytest.approx([m["loss"] for m in torch_adamw], rel=1e-4)
    assert ours[-1]["loss"] != ours[0]["loss"]  # and the optimizer stepped


def test_export_loads_in_stock_open_clip_as_file_and_folder(shards, tmp_path):
    import open_clip

    out = tmp_path / "run"
    _run([sys.executable, "-m", "vlp", "train", *_overrides(shards, out, "train.steps=3")])
    from vlp.app.cli import main as vlp_main  # export is light: in this process

    exported = tmp_path / "export" / "model.safetensors"
    assert vlp_main(["export", str(out), "--out", str(exported)]) == 0
    # stock open_clip, with our config registered from the json written next to the export under the output's
    # name (so the model is "model" to open_clip; the subprocess below loads the export where vlp cannot be imported)
    assert json.loads((exported.parent / "model.json").read_text())["embed_dim"] > 0
    assert not (exported.parent / "vlp-micro.json").exists()  # never a name taken from the weights' metadata
    open_clip.add_model_config(exported.parent / "model.json")
    model, _, preprocess = open_clip.create_model_and_transforms("model", pretrained=str(exported))
    model.eval()
    # the same weights through vlp's own loader of the checkpoint
    from safetensors.torch import load_file

    from vlp.core.config import ModelConfig
    from vlp.core.models import create_model

    ours, _, _, tokenizer = create_model(ModelConfig(name="vlp-micro"))
    state = load_file(str(out / "checkpoints" / "step_00000003" / "model.safetensors"))
    ours.load_state_dict({k: (v.reshape(1) if k == "logit_scale" else v) for k, v in state.items()})
    ours.eval()
    torch.manual_seed(0)
    images = torch.randn(4, 3, 32, 32)
    texts = tokenizer(["a red circle", "two blue squares", "a star", "three green triangles"])
    with torch.no_grad():
        a_img, a_txt = model.encode_image(images), model.encode_text(texts)
        b_img, b_txt = ours.encode_image(images), ours.encode_text(texts)
    assert torch.allclose(a_img, b_img, atol=1e-6) and torch.allclose(a_txt, b_txt, atol=1e-6)

    # --format open_clip-dir: plain open_clip, in a process where vlp cannot be imported, by path and
    # through its Hub loader (the folder placed in a Hugging Face cache, offline)
    folder = tmp_path / "open_clip_dir"
    assert vlp_main(["export", str(out), "--format", "open_clip-dir", "--out", str(folder)]) == 0
    assert {"open_clip_config.json", "open_clip_model.safetensors", "README.md"} <= {p.name for p in folder.iterdir()}
    card = (folder / "README.md").read_text()
    front = yaml.safe_load(card.split("---\n")[1])  # the Hub's metadata block
    assert front["library_name"] == "open_clip" and "clip" in front["tags"]
    assert str(tmp_path) not in card  # no path of this machine
    snapshot = tmp_path / "hub" / "models--someone--vlp-micro" / "snapshots" / ("0" * 40)
    shutil.copytree(folder, snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    torch.save({"images": images, "texts": ["a red circle", "two blue squares", "a star", "three green triangles"]},
               tmp_path / "inputs.pt")
    names = (f"local-dir:{folder}", "hf-hub:someone/vlp-micro")
    script = (  # one interpreter for both loaders
        "import sys; sys.modules['vlp'] = None\n"  # an import of vlp would fail
        "import open_clip, torch\n"
        f"x = torch.load({str(tmp_path / 'inputs.pt')!r})\n"
        f"for i, name in enumerate({names!r}):\n"
        "    model, _, _ = open_clip.create_model_and_transforms(name)\n"
        "    tok = open_clip.get_tokenizer(name)\n"
        "    model.eval()\n"
        "    with torch.no_grad():\n"
        "        out = (model.encode_image(x['images']), model.encode_text(tok(x['texts'])))\n"
        f"    torch.save(out, {str(tmp_path)!r} + f'/embedded{{i}}.pt')\n"
    )
    env = dict(_env(), HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "hub"))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    for i, name in enumerate(names):
        c_img, c_txt = torch.load(tmp_path / f"embedded{i}.pt")
        assert torch.allclose(c_img, b_img, atol=1e-6) and torch.allclose(c_txt, b_txt, atol=1e-6), name


def test_periodic_eval_runs_the_eval_package_on_checkpoints(shards, tmp_path):
    suite = tmp_path / "suite.yaml"
    suite.write_text(
        "name: tiny\ntasks:\n"
        "  - name: shape\n    type: zeroshot_classification\n"
        "    dataset: {format: synthetic, attribute: shape, n: 4}\n    templates: ['a {c}.']\n"
        "  - name: counting\n    type: counting\n    dataset: {format: synthetic, n: 3, min_count: 1, max_count: 3}\n"
    )
    out = tmp_path / "run"
    env_cache = {"VLP_CACHE_DIR": str(tmp_path / "cache")}
    os.environ.update(env_cache)
    try:
        _run(_torchrun(2, _overrides(shards, out, "train.steps=4", "train.eval_every=2",
                                     f"train.eval_suite={suite}")))
    finally:
        os.environ.pop("VLP_CACHE_DIR")
    evals = [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [2, 4]
    assert {"eval/shape/acc1", "eval/counting/acc1"} <= set(evals[0])
    assert all(0.0 <= e["eval/shape/acc1"] <= 1.0 for e in evals)
    report = json.loads((out / "eval" / "step_00000004" / "report.json").read_text())
    assert report["run"]["world_size"] == 2  # both training ranks shared the encoding
    assert report["tasks"]["shape"]["n_scored"] == report["tasks"]["shape"]["n_items"]
    assert len(_metrics(out)) == 4  # eval lines do not mix into the per-step metrics
