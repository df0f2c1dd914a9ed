"""Step parity with open_clip_train: the same weights, batches and settings give the same steps.

    python bench/parity.py [--steps 12] [--loss softmax,sigmoid] [--world 1,2] [--model vlp-micro]
                           [--work /tmp/vlp-parity] [--no-json]

Both tools start from one initial state dict (an open_clip model, seed 0, its learnable
temperature put at the clamp, log 100, so the clamp both tools apply is exercised), train
on the same batches in the same order and are compared step by step:

- vlp: `vlp train --config configs/open_clip_train.yaml` (open_clip_train's defaults as vlp
  keys) with the run's size as overrides, under DeepSpeed, one process or torchrun with 2
  ranks. Its loss per step and its sample keys per step come from metrics.jsonl, its final
  weights from the last checkpoint.
- The batches: vlp's own loader, rebuilt from the run's config.yaml in this process, gives
  every rank's batches again (checked key for key against metrics.jsonl): normalised images
  and token ids, saved to a file.
- open_clip_train: its own `open_clip_train.main.main`, run as a user runs it (optimizer and
  parameter groups, cosine schedule, logit-scale clamp, DDP, its loss modules), with two
  things replaced: `get_data` returns the saved batches of the rank, and `create_loss`
  records each step's loss. With 2 ranks it runs under torchrun with `--local-loss
  --gather-with-grad` (the settings under which its gradient is the global batch's; without
  them each rank's gradient is 1/world of it, see the docs' parity page), gloo on CPU, its
  DDP given no device ids (a CPU module; its code passes the device).

Printed and written: per setting, the largest relative difference of the per-step losses,
and the largest difference of any weight after the last step relative to the largest
change of a weight over the run. The test (tests/test_parity.py) asserts both are small.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ is not a package
from baselines import write_result  # noqa: E402

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
PRESET = REPO / "configs" / "open_clip_train.yaml"


@dataclass(frozen=True)
class Setting:
    loss: str = "softmax"  # softmax | sigmoid
    world: int = 1  # processes (ranks)
    steps: int = 12
    model: str = "vlp-micro"
    batch: int = 16  # per rank
    lr: float = 2e-3
    warmup: int = 3
    seed: int = 0

    @property
    def name(self) -> str:
        return f"{self.loss}-{self.world}rank"


@dataclass
class Parity:
    setting: Setting
    vlp_losses: list[float]
    open_clip_losses: list[float]
    loss_rel_diff: float  # max over steps of |vlp - oc| / |oc|
    weight_diff: float  # max over every weight of |vlp - oc| after the last step ...
    weight_change: float  # ... and the largest |w_last - w_init| of open_clip_train's run

    @property
    def weight_rel_diff(self) -> float:
        return self.weight_diff / self.weight_change

    def line(self) -> str:
        return (f"{self.setting.name}: {len(self.vlp_losses)} steps, loss {self.vlp_losses[0]:.4f} -> "
                f"{self.vlp_losses[-1]:.4f}; max loss rel diff {self.loss_rel_diff:.2e}; max weight diff "
                f"{self.weight_diff:.2e} ({self.weight_rel_diff:.2e} of the largest weight change "
                f"{self.weight_change:.2e})")


# ---------------------------------------------------------------- inputs


def make_shards(work: Path, pairs: int = 192) -> Path:
    """Synthetic pairs, built into shards by vlp (small: the batches are what matters)."""
    from vlp.data_tools.build import build_shards
    from vlp.data_tools.synth import generate

    from vlp.core.config import ShardsBuildConfig

    shards = work / "shards"
    if not (shards / "manifest.json").exists():
        shutil.rmtree(shards, ignore_errors=True)
        csv_path = generate(work / "pairs", n=pairs, seed=5, image_size=48, progress=False)
        build_shards(ShardsBuildConfig(inputs=[str(csv_path)], output=str(shards), image_size=48, shard_size=64,
                                       workers=0), progress=False)
    return shards


def initial_weights(work: Path, s: Setting) -> Path:
    """One open_clip state dict both tools start from (0-dim logit parameters, as open_clip saves them)."""
    from safetensors.torch import save_file

    from vlp.core.config import LossConfig, ModelConfig
    from vlp.core.models import create_model, to_open_clip_state_dict

    torch.manual_seed(s.seed)
    model, *_ = create_model(ModelConfig(name=s.model), LossConfig(kind=s.loss))
    if s.loss == "softmax":  # at the clamp: the first updates push it past, and both tools must clamp it back
        with torch.no_grad():
            model.logit_scale.fill_(math.log(100))
    path = work / f"init-{s.loss}.safetensors"
    save_file({k: v.contiguous() for k, v in to_open_clip_state_dict(model.state_dict()).items()}, str(path))
    return path


# ---------------------------------------------------------------- vlp


def _rank_command(world: int) -> list[str]:
    if world == 1:
        return [sys.executable]
    torchrun = Path(sys.executable).parent / "torchrun"
    return [str(torchrun), "--standalone", f"--nproc_per_node={world}"]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(BENCH)}


def run_vlp(work: Path, s: Setting, shards: Path, init: Path, extra: tuple[str, ...] = ()) -> Path:
    out = work / f"vlp-{s.name}"
    shutil.rmtree(out, ignore_errors=True)
    overrides = [f"data.sources=[{{shards: '{shards}'}}]", "data.workers=0", f"model.name={s.model}",
                 f"model.pretrained={init}", f"loss.kind={s.loss}", f"train.batch_size={s.batch}",
                 f"train.steps={s.steps}", f"optim.lr={s.lr}", f"optim.warmup_steps={s.warmup}",
                 f"train.seed={s.seed}", "train.log_keys=true", f"train.output_dir={out}",
                 f"train.checkpoint_every={10**6}", *extra]
    cmd = [*_rank_command(s.world), "-m", "vlp", "train", "--config", str(PRESET), *overrides]
    done = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=900)
    if done.returncode != 0:
        raise RuntimeError(f"vlp train failed:\n{done.stderr[-4000:]}")
    return out


def vlp_losses_and_keys(run: Path) -> tuple[list[float], list[list[str]]]:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [m["loss"] for m in lines], [m["keys"] for m in lines]


def vlp_weights(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    last = sorted((run / "checkpoints").glob("step_*"), key=lambda p: int(p.name.split("_")[-1]))[-1]
    return load_file(str(next(last.rglob("model.safetensors"))))


def replay_batches(run: Path, s: Setting, keys: list[list[str]]) -> Path:
    """Every rank's batches as vlp's loader makes them for this run (its config.yaml), as model input."""
    import yaml

    from vlp.core.config import RunConfig
    from vlp.core.models import create_model, image_normalization
    from vlp.train.loader.batches import ShardLoader, normalize

    cfg = RunConfig.model_validate(yaml.safe_load((run / "config.yaml").read_text()))
    model, _, _, tokenizer = create_model(cfg.model, cfg.loss)
    mean, std = image_normalization(model)
    size = model.visual.image_size
    size = size[0] if isinstance(size, tuple | list) else size
    per_rank = []
    for rank in range(s.world):
        loader = ShardLoader(cfg.data, batch_size=cfg.train.batch_size, image_size=size, tokenizer=tokenizer,
                             rank=rank, world_size=s.world, seed=cfg.train.seed)
        stream = loader.stream()
        per_rank.append([next(stream) for _ in range(s.steps)])
    for step in range(s.steps):  # the batches vlp trained on, in order, rank after rank
        seen = [k for rank in range(s.world) for k in per_rank[rank][step].keys]
        if seen != keys[step]:
            raise RuntimeError(f"step {step}: the replayed batch is not the one vlp trained on")
    path = run / "batches.pt"
    torch.save([[(normalize(b.images, mean, std), b.texts) for b in batches] for batches in per_rank], path)
    return path


# ---------------------------------------------------------------- open_clip_train


def run_open_clip(work: Path, s: Setting, init: Path, batches: Path) -> Path:
    out = work / f"oc-{s.name}"
    shutil.rmtree(out, ignore_errors=True)
    args = ["--model", s.model, "--pretrained", str(init), "--batch-size", str(s.batch), "--epochs", "1",
            "--lr", str(s.lr), "--warmup", str(s.warmup), "--precision", "fp32", "--device", "cpu",
            "--workers", "0", "--save-frequency", "1", "--logs", str(out), "--name", "run", "--seed", str(s.seed),
            "--dataset-type", "synthetic", "--train-num-samples", str(s.steps * s.batch * s.world),
            "--log-every-n-steps", "1", *(["--siglip"] if s.loss == "sigmoid" else []),
            *(["--local-loss", "--gather-with-grad"] if s.world > 1 else [])]
    out.mkdir(parents=True)
    job = out / "job.json"  # its flags travel in a file: torchrun would take `--logs` for an abbreviation of its own
    job.write_text(json.dumps({"batches": str(batches), "out": str(out), "argv": args}))
    cmd = [*_rank_command(s.world), str(BENCH / "parity.py"), "open-clip-rank", str(job)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=900)
    if done.returncode != 0:
        raise RuntimeError(f"open_clip_train failed:\n{(done.stdout + done.stderr)[-4000:]}")
    return out


def open_clip_rank(job_file: str) -> None:
    """One rank of open_clip_train.main, fed the saved batches of its rank (run under torchrun for 2 ranks)."""
    job = json.loads(Path(job_file).read_text())
    batches_file, out, argv = job["batches"], job["out"], job["argv"]
    import open_clip_train.main as oc_main
    from open_clip_train.data import DataInfo

    from vlp.core.models import register_model_configs

    register_model_configs()  # vlp's small model configs, as open_clip's own
    rank = int(os.environ.get("RANK", "0"))
    batches = torch.load(batches_file, weights_only=True)[rank]

    class Replay:
        num_batches = len(batches)
        num_samples = len(batches) * len(batches[0][0]) * int(os.environ.get("WORLD_SIZE", "1"))

        def __iter__(self):
            return iter(batches)

    losses: list[float] = []

    class Recording(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, *args, **kwargs):
            out = self.inner(*args, **kwargs)
            losses.append(float(sum(out.values()) if isinstance(out, dict) else out))
            return out

    real_create_loss, real_ddp = oc_main.create_loss, torch.nn.parallel.DistributedDataParallel
    oc_main.get_data = lambda *a, **k: {"train": DataInfo(Replay())}
    oc_main.create_loss = lambda args: Recording(real_create_loss(args))

    def cpu_ddp(module, device_ids=None, **kw):  # its main passes the device; a CPU module takes none
        return real_ddp(module, device_ids=None, **kw)

    torch.nn.parallel.DistributedDataParallel = cpu_ddp
    oc_main.main(argv)
    Path(out, f"losses-{rank}.json").write_text(json.dumps(losses))


def open_clip_losses(out: Path, world: int) -> list[float]:
    per_rank = [json.loads((out / f"losses-{r}.json").read_text()) for r in range(world)]
    return [sum(values) / world for values in zip(*per_rank, strict=True)]  # each rank's mean: the global loss


def open_clip_weights(out: Path) -> dict[str, torch.Tensor]:
    ckpt = torch.load(out / "run" / "checkpoints" / "epoch_1.pt", map_location="cpu", weights_only=True)
    return {k.removeprefix("module."): v for k, v in ckpt["state_dict"].items()}


# ---------------------------------------------------------------- comparing


def _functional(key: str, delta: torch.Tensor) -> torch.Tensor:
    """`delta` without the attention key biases: they shift every logit of a softmax row alike, so no
    output depends on them and their gradient is zero but for rounding, which Adam (m / sqrt(v))
    turns into full-size steps of either sign, in both tools. The rest must agree."""
    if key.endswith("attn.in_proj_bias"):
        third = delta.numel() // 3
        return torch.cat([delta[:third], delta[2 * third:]])
    return delta


def compare(s: Setting, vlp_run: Path, oc_out: Path, init: Path) -> Parity:
    from safetensors.torch import load_file

    vlp_losses, _ = vlp_losses_and_keys(vlp_run)
    oc_losses = open_clip_losses(oc_out, s.world)
    if len(vlp_losses) != len(oc_losses):
        raise RuntimeError(f"{len(vlp_losses)} vlp steps, {len(oc_losses)} open_clip_train steps")
    loss_diff = max(abs(a - b) / abs(b) for a, b in zip(vlp_losses, oc_losses, strict=True))
    start, ours, theirs = load_file(str(init)), vlp_weights(vlp_run), open_clip_weights(oc_out)
    if set(ours) != set(theirs):
        raise RuntimeError(f"state dicts differ in keys: {sorted(set(ours) ^ set(theirs))[:5]}")
    diff = max(float(_functional(k, ours[k].reshape(theirs[k].shape) - theirs[k]).abs().max()) for k in theirs)
    change = max(float((theirs[k] - start[k].reshape(theirs[k].shape)).abs().max()) for k in theirs)
    return Parity(s, vlp_losses, oc_losses, loss_diff, diff, change)


def run(work: Path, s: Setting, extra: tuple[str, ...] = ()) -> Parity:
    work.mkdir(parents=True, exist_ok=True)
    shards = make_shards(work)
    init = initial_weights(work, s)
    vlp_run = run_vlp(work, s, shards, init, extra)
    _, keys = vlp_losses_and_keys(vlp_run)
    batches = replay_batches(vlp_run, s, keys)
    oc_out = run_open_clip(work, s, init, batches)
    return compare(s, vlp_run, oc_out, init)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "open-clip-rank":
        open_clip_rank(sys.argv[2])
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--loss", default="softmax,sigmoid")
    p.add_argument("--world", default="1,2")
    p.add_argument("--model", default="vlp-micro")
    p.add_argument("--work", type=Path, default=Path("/tmp/vlp-parity"))
    p.add_argument("--no-json", action="store_true", help="print only (default: write bench/results/parity.json)")
    a = p.parse_args()
    results = []
    for loss in a.loss.split(","):
        for world in (int(w) for w in a.world.split(",")):
            r = run(a.work, Setting(loss=loss, world=world, steps=a.steps, model=a.model))
            print(r.line(), flush=True)
            results.append(r)
    if not a.no_json:
        rows = [[r.setting.loss, r.setting.world, len(r.vlp_losses), f"{r.vlp_losses[0]:.4f} -> {r.vlp_losses[-1]:.4f}",
                 f"{r.loss_rel_diff:.1e}", f"{r.weight_rel_diff:.1e}"] for r in results]
        write_result("parity", "Step parity with open_clip_train", [{
            "columns": ["loss", "ranks", "steps", "vlp loss", "max loss rel diff", "max weight diff / largest change"],
            "rows": rows}], order=5,
            about=f"{a.model}, batch {Setting().batch} per rank, fp32, from one initial state dict; see the parity page",
            runs=[{**asdict(r.setting), "vlp_losses": r.vlp_losses, "open_clip_losses": r.open_clip_losses}
                  for r in results])


if __name__ == "__main__":
    main()
