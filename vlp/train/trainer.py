"""`vlp train`: contrastive pretraining under a DeepSpeed engine with exact gradient caching.

One optimizer step, end to end:

    loader Batch (uint8 images, token ids, keys)          vlp.train.loader.batches
      -> normalised per chunk on the device                vlp.train.loader.batches.normalize
      -> GradCache.step: forwards/backwards in chunks     vlp.train.gradcache, vlp.train.losses
      -> engine.step(): clip, AdamW update                DeepSpeed
      -> metrics line, maybe a checkpoint                 vlp.train.checkpoint

The same command runs a single CPU process or many GPU nodes: the launcher's
environment says where this process sits (vlp.core.distributed), and without a
GPU DeepSpeed's CPU accelerator and gloo are used. SIGTERM / SIGINT (SLURM
preemption, Ctrl-C) finish the current step, save a checkpoint and exit 0.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import math
import os
import resource
import secrets
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from vlp.core import distributed as vdist
from vlp.core import storage
from vlp.core.atomic import write_atomic
from vlp.core.config import RunConfig, dump_config
from vlp.core.errors import UserError, first_line
from vlp.core.models import check_model, create_model, image_normalization
from vlp.train.checkpoint import (
    check_run_folder,
    check_same_run,
    claim_run_folder,
    load_checkpoint,
    resolve_resume,
    save_checkpoint,
    use_safe_loading,
)
from vlp.train.distill import EmaTeacher, FrozenTeacher, check_teacher
from vlp.train.dsconfig import (
    check_deepspeed_config,
    deepspeed_config,
    offloads_optimizer,
    precision_of,
    zero_stage_of,
)
from vlp.train.gradcache import GradCache
from vlp.train.loader.batches import Batch, ShardLoader, normalize
from vlp.train.loader.plan import PlanSpec, steps_per_epoch
from vlp.train.loader.sources import resolve_sources
from vlp.train.losses import ContrastiveLoss
from vlp.train.runstore import RunStore
from vlp.train.schedule import adam_settings, clamp_logit_scale, lr_at, make_optimizer, param_groups, set_lr
from vlp.train.speedups import (
    choose_speedups,
    compile_engine,
    compile_seconds,
    trim_tokens,
    use_channels_last,
    use_direct_attention,
)
from vlp.train.tokendrop import TokenDrop, truncate_tokens


@dataclass
class Position:
    """Where training stands: what a checkpoint must restore besides weights and RNG."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # data epoch of the last consumed batch
    batch: int = -1  # its index in the epoch (-1: none yet)
    samples: int = 0  # global samples seen
    replaced: int = 0  # bad samples replaced by the loader, all ranks

    def as_dict(self) -> dict:
        return dict(self.__dict__)


class _Window:
    """The steps since the last metrics line: their samples, bad samples replaced on this rank, time
    and compile time (compile_s is logged apart, so the first steps' rate shows what compiling cost)."""

    def __init__(self) -> None:
        self.start, self.samples, self.replaced = time.perf_counter(), 0, 0
        self.compiled_before = compile_seconds()

    def add(self, samples: int, replaced: int) -> None:
        self.samples += samples
        self.replaced += replaced

    def rates(self) -> dict:
        seconds = time.perf_counter() - self.start
        return {"samples_per_s": self.samples / seconds,
                "compile_s": round(compile_seconds() - self.compiled_before, 3)}


@dataclass
class TrainResult:
    position: Position
    output_dir: Path
    stopped_by_signal: bool = False
    losses: list[float] = field(default_factory=list)


STOP_FILE_ENV = "VLP_STOP_FILE"


class _StopFlag:
    """A clean stop after the current step is asked for by SIGTERM/SIGINT (a second SIGINT interrupts),
    or by the file named in $VLP_STOP_FILE appearing.

    The file is how a batch script stops a run it did not start directly: torchrun puts
    its workers in sessions of their own and answers SIGTERM by exiting 1 (and SIGKILLs
    workers still alive 30 s later), so launch/slurm*.sbatch trap SLURM's warning signal
    and touch the file instead; the trainer checkpoints, exits 0, and the script requeues.
    Any rank seeing it is enough: the step's all-reduce tells every rank.
    """

    def __init__(self) -> None:
        self.signalled = False
        self.stop_file = os.environ.get(STOP_FILE_ENV) or None
        self._previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
        for s in self._previous:
            signal.signal(s, self._handle)

    @property
    def requested(self) -> bool:
        return self.signalled or (self.stop_file is not None and os.path.exists(self.stop_file))

    def _handle(self, signum, frame) -> None:
        if self.signalled and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signalled = True

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


def total_steps(cfg: RunConfig, world_size: int) -> int:
    """The run's length in optimizer steps: train.steps, else train.epochs of the data plan, else train.samples."""
    if cfg.train.steps:
        return cfg.train.steps
    if cfg.train.epochs:
        spec = PlanSpec(batch_size=cfg.train.batch_size, world_size=world_size, split=cfg.data.split,
                        samples_per_epoch=cfg.data.samples_per_epoch)
        return cfg.train.epochs * steps_per_epoch(spec, resolve_sources(cfg.data.sources))
    return math.ceil(cfg.train.samples / (cfg.train.batch_size * world_size))


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# train.report_to's backends -> the module each needs (named like the pip extra that installs it).
REPORT_MODULES = {"tensorboard": "tensorboard", "wandb": "wandb"}


def check_report_to(backends: list[str]) -> None:
    """Each requested logging backend is installed, or a one-line UserError naming its pip extra.

    find_spec looks for the module without importing it (wandb and tensorboard are slow to import).
    """
    for backend in backends:
        try:
            found = importlib.util.find_spec(REPORT_MODULES[backend]) is not None
        except (ImportError, ValueError):  # a blocked or half-removed install
            found = False
        if not found:
            raise UserError(f"train.report_to lists {backend}, which is not installed: "
                            f"pip install 'vlp[{backend}]' (or remove it from train.report_to)")


# out.log's fields: (metrics.jsonl key, label, format)
LOG_LINE = (("step", "step", ""), ("epoch", "epoch", ""), ("loss", "loss", ".4f"), ("lr", "lr", ".3g"),
            ("samples_per_s", "samples/s", ".1f"), ("skipped_samples", "skipped", ""))


class _Metrics:
    """Where the scalars go, rank 0 only: metrics.jsonl (one line per step) always, and the
    backends of train.report_to: tensorboard (event files in tensorboard/), wandb (a run in wandb/).

    Beside metrics.jsonl, out.log has the same steps as plain lines (no carriage returns: what a
    cluster's log collector and `tail -f` want, where a progress bar is noise).

    A resumed run keeps one history: metrics.jsonl and eval.jsonl drop the records past the
    checkpoint, tensorboard purges them, and wandb resumes the same run (its id is kept in
    wandb_run_id), logging at the same global steps. wandb's own variables (WANDB_PROJECT,
    WANDB_DIR, WANDB_MODE, ...) are honoured; train.wandb_project is the project when
    WANDB_PROJECT is not set.
    """

    def __init__(self, cfg: RunConfig, out: Path, enabled: bool, resumed_step: int = 0):
        self.enabled, self.out = enabled, out
        self.fh = self.log_fh = self.tb = self.wandb = None
        if not enabled:
            return
        for name in ("metrics.jsonl", "eval.jsonl"):
            _truncate_history(out / name, resumed_step)
        self.fh = open(out / "metrics.jsonl", "a")  # noqa: SIM115
        self.log_fh = open(out / "out.log", "a")  # noqa: SIM115
        self.line(f"vlp train: {'resuming at step ' + str(resumed_step) if resumed_step else 'starting'}; "
                  f"{cfg.model.name}, batch {cfg.train.batch_size} per rank")
        backends = cfg.train.report_to
        if "tensorboard" in backends:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / "tensorboard"), purge_step=resumed_step + 1 if resumed_step else None)
        if "wandb" in backends:
            import wandb

            id_file = out / "wandb_run_id"
            run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(4)  # wandb-style 8 chars
            try:  # online without a login fails here, before the first step
                self.wandb = wandb.init(
                    project=os.environ.get("WANDB_PROJECT") or cfg.train.wandb_project,
                    name=cfg.train.run_name or out.resolve().name, dir=os.environ.get("WANDB_DIR") or str(out),
                    config=cfg.model_dump(mode="json"), id=run_id, resume="allow",
                )  # mode: wandb reads $WANDB_MODE (online, offline, disabled)
                write_atomic(id_file, run_id)  # a requeued job resumes this run instead of starting another
            except wandb.errors.Error as err:
                self.close()
                raise UserError(f"train.report_to: wandb could not start a run ({first_line(err)}); "
                                "run `wandb login`, or set WANDB_MODE=offline") from None

    def line(self, text: str) -> None:
        """A plain line in out.log, time-stamped."""
        if self.log_fh is not None:
            self.log_fh.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {text}\n")
            self.log_fh.flush()

    def log(self, record: dict) -> None:
        """One step's record: a line of metrics.jsonl and of out.log; its numbers to the backends as train/<key>."""
        if not self.enabled:
            return
        self.fh.write(json.dumps(record, allow_nan=False) + "\n")
        self.fh.flush()
        self.line(" ".join(f"{name} {record[key]:{spec}}" for key, name, spec in LOG_LINE if key in record))
        scalars = {f"train/{key}": value for key, value in record.items()
                   if isinstance(value, int | float) and key != "step"}
        self._report(record["step"], scalars)

    def log_eval(self, step: int, values: dict[str, float]) -> None:
        """Periodic eval results: eval.jsonl (one line per eval) and the report_to backends."""
        if not self.enabled:
            return
        with open(self.out / "eval.jsonl", "a") as fh:
            fh.write(json.dumps({"step": step, **values}) + "\n")
        self._report(step, values)

    def _report(self, step: int, scalars: dict[str, float]) -> None:
        if self.tb is not None:
            for key, value in scalars.items():
                self.tb.add_scalar(key, value, step)
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def close(self, failed: bool = False) -> None:
        """Flush and close everything; a wandb run ends with exit code 1 when training raised."""
        if self.fh:
            self.fh.close()
        if self.log_fh:
            self.line("vlp train: stopped by an error" if failed else "vlp train: done")
            self.log_fh.close()
            self.log_fh = None
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish(exit_code=1 if failed else 0)
            self.wandb = None


def _truncate_history(path: Path, step: int) -> None:
    """Keep only records up to `step`, the step a run starts (or resumes) from.

    A killed run may have logged steps past its last checkpoint (and a partial
    last line); the resumed run redoes those steps, so the file keeps one
    consistent history instead of duplicates.
    """
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by the kill
            continue
        if record.get("step", 0) <= step:
            kept.append(line + "\n")
    write_atomic(path, "".join(kept))


def _single_process_env() -> None:
    """DeepSpeed always joins a process group: give a lone process a private one."""
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    os.environ.setdefault("MASTER_PORT", str(vdist.find_free_port()))


def preflight(cfg: RunConfig, folder: bool = True) -> None:
    """Fail in a second, in one line, on what would otherwise fail after setup: the output folder,
    the shards, the model, its weights, the DeepSpeed JSON, the resume checkpoint, the logging backends.
    `folder=False`: all but the output folder (an object-storage run checks its mirror once filled)."""
    if folder:
        check_run_folder(Path(cfg.train.output_dir), cfg.train.resume)
    check_report_to(cfg.train.report_to)
    resolve_sources(cfg.data.sources)
    check_model(cfg.model)
    check_teacher(cfg.loss, cfg.model)
    check_deepspeed_config(cfg)
    if cfg.train.channels_last is True and zero_stage_of(deepspeed_config(cfg, 1)) > 0:
        # ZeRO points the weights into its flat buffers; a new layout would cut them loose from the update
        raise UserError("config key 'train.channels_last': works with ZeRO stage 0 only (train.zero_stage=0)")
    if cfg.loss.ema_teacher is not None and zero_stage_of(deepspeed_config(cfg, 1)) == 3:
        # each rank averages the whole model into its own copy; ZeRO-3 leaves a rank only its share of it
        raise UserError("config key 'loss.ema_teacher': works with ZeRO stages 0-2 (train.zero_stage=3 splits the "
                        "weights the average is taken of)")
    if folder:
        check_resume(cfg)


def check_resume(cfg: RunConfig) -> None:
    """The checkpoint a run would resume from verifies and has the run's model and layout."""
    if cfg.train.resume is not None:
        path = resolve_resume(cfg.train.resume, Path(cfg.train.output_dir) / "checkpoints", say=lambda line: None)
        if path is not None:
            check_same_run(path, cfg.model_dump())


class Trainer:
    """Holds what one run needs; `run()` trains until the length in the config."""

    def __init__(self, cfg: RunConfig, evaluate: Callable[[Path], dict[str, float]] | None = None):
        """`evaluate(checkpoint)` -> metrics runs every `train.eval_every` steps (the app's eval hook)."""
        self.config_yaml = dump_config(cfg)  # as given: an object-storage output_dir stays its URL
        self.is_main = vdist.detect_env().rank == 0
        # an object-storage output_dir: the run lives in a local mirror, filled here and copied up at checkpoints
        self.store = RunStore(cfg.train.output_dir) if storage.is_object_url(cfg.train.output_dir) else None
        if self.store is None:
            preflight(cfg)  # everything checkable, before DeepSpeed and before any folder is made
        else:
            cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"output_dir": str(self.store.local)})})
            preflight(cfg, folder=False)  # before anything is claimed at the URL
            if self.is_main:  # the other ranks read the mirror only after DeepSpeed's setup, which waits for this
                self.store.pull(cfg.train.resume)
                check_resume(cfg)
        self.cfg = cfg
        self.evaluate = evaluate
        self.out = Path(cfg.train.output_dir)
        self.env = vdist.init_distributed()
        if self.env.world_size == 1:
            _single_process_env()
        vdist.prepare_for_deepspeed()  # before deepspeed is imported
        self.lock = claim_run_folder(self.out) if self.is_main else None
        self.out.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(cfg.train.seed + self.env.rank)
        flush = cfg.train.flush_denormal
        # a CPU computes with denormal floats in microcode, far slower; GPUs flush them anyway
        want = not torch.cuda.is_available() if flush == "auto" else bool(flush)
        self.flushes_denormals = want and torch.set_flush_denormal(want)  # False where the CPU cannot
        self._build()

    # ------------------------------------------------------------ setup

    def _build(self) -> None:
        import deepspeed  # here, not at the top: DeepSpeed picks its accelerator when imported

        cfg, env = self.cfg, self.env
        deepspeed.init_distributed(dist_backend=vdist.pick_backend(), verbose=False)
        model, _, _, tokenizer = create_model(cfg.model, cfg.loss)
        self.ds_config = deepspeed_config(cfg, env.world_size)
        self.speedups = choose_speedups(cfg.train, model, cfg.model.name, zero_stage_of(self.ds_config))
        if self.speedups.direct_attention:
            use_direct_attention(model)
        self.total_steps = total_steps(cfg, env.world_size)
        self.token_drop = TokenDrop(cfg, self.total_steps)
        self.token_drop.prepare(model)
        self.precision = precision_of(self.ds_config)
        optimizer = None if offloads_optimizer(self.ds_config) else make_optimizer(model, cfg.optim, cfg.model.name)
        if optimizer is None:  # ZeRO-Offload wants DeepSpeed's CPU Adam, configured by name
            betas, eps = adam_settings(cfg.optim, cfg.model.name)
            self.ds_config["optimizer"] = {"type": "AdamW", "params": {"lr": cfg.optim.lr, "betas": list(betas),
                                                                       "eps": eps}}
            params = param_groups(model, cfg.optim.weight_decay)
        else:
            params = None
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, model_parameters=params, config=self.ds_config
        )
        use_safe_loading(self.engine)  # resuming never unpickles more than tensors and plain data
        if env.world_size == 1 and zero_stage_of(self.ds_config) == 0 and self.precision == "fp32":
            # Alone, DeepSpeed's gradient "all-reduce" copies every gradient into a flat buffer and back
            # to average over one rank: a visible share of a small model's step, for the same numbers.
            self.engine.enable_backward_allreduce = False
        if self.speedups.channels_last:  # after initialize: DeepSpeed's broadcast of the weights needs them dense
            use_channels_last(self.engine.module)
        # the model as it starts (after the broadcast, before compiling): the EMA teacher's first state
        self.ema = EmaTeacher(self.engine.module, cfg.loss.ema_teacher, cfg.model.name) if cfg.loss.ema_teacher \
            else None
        if cfg.train.compile:
            compile_engine(self.engine)  # compiles lazily, at the first forward of each kind
        joined = vdist.joined_hosts()  # in every log: did every node join?
        if self.is_main:
            denormals = "; denormals flushed" if self.flushes_denormals else ""
            print(f"vlp train: {joined}; {self.speedups.line()}{denormals}", file=sys.stderr)
        if optimizer is None and self.is_main:
            print(f"optimizer states offloaded: {type(self.engine.basic_optimizer).__name__}", file=sys.stderr)
        self.device = self.engine.device
        size = self.engine.module.visual.image_size
        self.image_size = size[0] if isinstance(size, tuple | list) else size
        mean, std = image_normalization(self.engine)
        self.loader = ShardLoader(
            cfg.data, batch_size=cfg.train.batch_size, image_size=self.image_size, tokenizer=tokenizer,
            rank=env.rank, world_size=env.world_size, seed=cfg.train.seed,
        )
        self.loss = ContrastiveLoss.from_config(cfg.loss)
        teacher = FrozenTeacher(cfg.loss, self.engine, self.device) if cfg.loss.distill_model else self.ema
        self.gradcache = GradCache(
            self.engine, self.loss, cfg.train.micro_batch_size,
            normalize_images=partial(normalize, mean=mean, std=std, device=self.device, memory_format=(
                torch.channels_last if self.speedups.channels_last else torch.contiguous_format)),
            teacher=teacher,
        )

    # ------------------------------------------------------------ checkpoints

    def _model_weights(self):
        """The open_clip state dict on rank 0 (a ZeRO-3 gather needs every rank)."""
        if zero_stage_of(self.ds_config) == 3:
            state = self.engine._zero3_consolidated_16bit_state_dict()
        else:
            state = self.engine.module.state_dict() if self.is_main else None
        return (state, self.cfg.model.name) if self.is_main else None

    def save(self, pos: Position) -> Path:
        path = save_checkpoint(
            self.engine, self.out / "checkpoints", pos.step, pos.as_dict(), self.config_yaml,
            self._model_weights, self.env.rank, self.cfg.train.keep_last,
            extra=self.ema.save if self.ema is not None else None,
        )
        if self.store is not None and self.is_main:
            self.store.push(path)
        return path

    def restore(self) -> Position:
        say = (lambda line: print(line, file=sys.stderr)) if self.is_main else (lambda line: None)
        path = resolve_resume(self.cfg.train.resume, self.out / "checkpoints", say)
        if path is None:
            return Position()
        state = load_checkpoint(self.engine, path, self.env.rank)
        if self.ema is not None:
            self.ema.load(path)
        if self.is_main:
            print(f"resumed from {path} (step {state['step']})", file=sys.stderr)
        return Position(**state)

    # ------------------------------------------------------------ the loop

    def _step(self, batch: Batch, pos: Position):
        """Forwards, backwards and the update; nothing is read off the device here."""
        lr = lr_at(pos.step, self.cfg.optim, self.total_steps)
        set_lr(self.engine.optimizer, lr)
        texts, negatives = batch.texts, batch.hard_negatives
        phase = self.token_drop.at(pos.step, self.engine)
        if phase.text_length is not None:
            texts = truncate_tokens(texts, phase.text_length)
            negatives = None if negatives is None else truncate_tokens(negatives, phase.text_length)
        self.gradcache.image_size = phase.image_size
        if self.speedups.trim_text:  # on the host tensors: finding the length costs no device sync
            texts, negatives = trim_tokens(texts, negatives)
        result = self.gradcache.step(batch.images, texts.to(self.device), negatives, batch.hard_negative_mask)
        self.engine.step()
        clamp_logit_scale(self.engine.module, self.cfg.loss.max_logit_scale)
        if self.ema is not None:
            self.ema.update(self.engine.module)
        return result, lr

    def _sync(self, result, lr: float, replaced: int) -> tuple[dict, bool]:
        """Read the step's numbers off the device, in one small all-reduce across ranks: global loss,
        bad samples replaced since the last sync, and whether any rank was asked to stop."""
        shared = torch.tensor([result.loss, float(replaced), float(self.stop.requested)])
        if dist.is_initialized() and self.env.world_size > 1:
            dist.all_reduce(shared)
            shared[0] /= self.env.world_size
        record = {"loss": shared[0].item(), "lr": lr, "replaced": int(shared[1].item()),
                  **{k: v for k, v in result.terms.items() if k != "loss"}}
        return record, bool(shared[2].item() > 0)

    def _keys_digest(self, batch: Batch) -> dict:
        keys = batch.keys
        if self.env.world_size > 1:
            gathered: list = [None] * self.env.world_size
            dist.all_gather_object(gathered, keys)
            keys = [k for part in gathered for k in part]
        if self.cfg.train.log_keys:
            return {"keys": keys}
        return {"keys_sha1": hashlib.sha1(",".join(keys).encode()).hexdigest()[:16]}

    def run(self) -> TrainResult:
        pos = self.restore()
        self.stop = _StopFlag()
        metrics = _Metrics(self.cfg, self.out, self.is_main, pos.step)
        if self.is_main:
            (self.out / "config.yaml").write_text(self.config_yaml)
        result = TrainResult(pos, self.out)
        bar = tqdm(total=self.total_steps, initial=pos.step, unit="step", desc="train",
                   disable=None if self.is_main else True, dynamic_ncols=True)  # None: off in non-TTY logs
        global_batch = self.cfg.train.batch_size * self.env.world_size
        stream = self.loader.stream(pos.epoch, pos.batch + 1)
        last_saved = pos.step
        failed = True  # until the loop ends normally or by a requested stop
        window = _Window()  # what happened since the last metrics line
        try:
            while pos.step < self.total_steps:
                batch = next(stream)
                step_result, lr = self._step(batch, pos)
                pos.step += 1
                pos.epoch, pos.batch = batch.epoch, batch.index
                pos.samples += global_batch
                window.add(global_batch, batch.replaced)
                bar.update(1)
                eval_due = self._eval_due(pos)
                checkpoint_due = pos.step % self.cfg.train.checkpoint_every == 0
                if pos.step % self.cfg.train.log_every and not (
                        checkpoint_due or eval_due or pos.step == self.total_steps):
                    continue  # nothing read off the device on this step: it runs ahead of the host
                record, stop = self._sync(step_result, lr, window.replaced)
                if not math.isfinite(record["loss"]):  # every later step would be NaN too: stop, say so
                    raise UserError(f"step {pos.step}: the loss is {record['loss']} (not finite); lower optim.lr, "
                                    f"or check the data and the loss settings; the last checkpoint is kept")
                pos.replaced += record.pop("replaced")
                record = {"step": pos.step, "time": round(time.time(), 3), "epoch": pos.epoch, "samples": pos.samples,
                          **record,
                          **window.rates(), "skipped_samples": pos.replaced,
                          "peak_memory_mb": _peak_memory_mb(self.device), **self._keys_digest(batch)}
                window = _Window()
                metrics.log(record)
                result.losses.append(record["loss"])
                bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.2e}",
                                sps=f"{record['samples_per_s']:.0f}", refresh=False)
                eval_due = eval_due and not stop
                if stop or eval_due or checkpoint_due:
                    checkpoint = self.save(pos)
                    last_saved = pos.step
                    if eval_due:
                        metrics.log_eval(pos.step, self.evaluate(checkpoint))
                if stop:
                    result.stopped_by_signal = True
                    if self.is_main:
                        why = "signal" if self.stop.signalled else f"stop file {self.stop.stop_file}"
                        bar.write(f"stopped by {why} at step {pos.step}; checkpoint saved", file=sys.stderr)  # own line
                    break
            if last_saved != pos.step:
                self.save(pos)
            failed = False
        except BaseException as err:  # the one-line reason in out.log too, then as before
            metrics.line(f"error: {first_line(err) or type(err).__name__}")
            raise
        finally:
            bar.close()
            metrics.close(failed)
            self.stop.restore()
            if self.store is not None and self.is_main and failed:  # the logs say why: up with them
                with contextlib.suppress(Exception):  # never hide the run's own error behind an upload's
                    self.store.push(None)
        return result

    def _eval_due(self, pos: Position) -> bool:
        every = self.cfg.train.eval_every
        return bool(self.evaluate and every and pos.step % every == 0)


def train(cfg: RunConfig, evaluate: Callable[[Path], dict[str, float]] | None = None) -> TrainResult:
    """Build the trainer from a validated config and run it."""
    trainer = Trainer(cfg, evaluate)
    try:
        return trainer.run()
    finally:
        if trainer.lock is not None:
            trainer.lock.__exit__(None, None, None)
        vdist.destroy_distributed()
