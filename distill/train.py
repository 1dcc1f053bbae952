"""One training entry point: `torchrun --nproc_per_node=N -m distill.train CONFIG` (one process: `python -m ...`).

CONFIG is JSON (or YAML when PyYAML is installed) for `TrainConfig`. Tasks: `vae` (the small Wan VAE on synthetic
videos), `teacher` (bidirectional flow matching on latent shards), `stage1` (causal flow-map pretraining of a student
initialised from a teacher), `stage2` (on-policy backward simulation + DMD, `distill.stage2`; its steps alternate
critic and generator, each with its own optimizer) and `consistency` (the consistency-distillation baseline,
`distill.consistency`). Small models train under DDP, large ones under FSDP2 (`parallel: fsdp`, one shard group
per transformer block).

Exact resumption: every random draw of step s comes from generators seeded by (seed, step, rank) and the data order
from (seed, epoch), so a checkpoint needs only the weights, optimizer, EMA, global RNG states, the loader's (epoch,
position) and the step. Checkpoints are written to a temporary folder and renamed; `latest` names the newest. Each
holds `model/`, a pipeline folder (EMA weights) that `streamgen generate --model` loads as it is.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import resource
import shutil
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.distributed as dist
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, model_validator
from torch import Tensor, nn

from distill.consistency import Consistency, ConsistencySettings
from distill.data import LatentShards, Loader
from distill.losses import (
    Denoiser,
    Stage1Settings,
    drop_captions,
    flow_matching_loss,
    init_student_from_teacher,
    pair_kinds,
)
from distill.losses import stage1_loss as stage1_objective
from distill.stage2 import PHASES, Stage2, Stage2Settings
from distill.synthetic import SyntheticVideos
from distill.vae_train import VaeObjective, with_latent_stats
from streamgen import model as model_module
from streamgen.config import TransformerConfig, preset
from streamgen.model import CausalWanTransformer, load_transformer
from streamgen.pipeline import Pipeline, PipelineSettings
from streamgen.text import WordHashEncoder
from streamgen.vae import VaeConfig, WanVAE
from streamgen.vae import preset as vae_preset

STATE_NAME = "state.pt"


class OptimConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    warmup_steps: int = 0
    grad_clip: float = 1.0
    ema_decay: float = 0.999


class SyntheticConfig(BaseModel):
    """Synthetic clips for the VAE task (indices 0..count-1 of dataset `seed`)."""

    model_config = ConfigDict(extra="forbid")

    count: PositiveInt = 256
    seed: int = 0
    frames: PositiveInt = 29
    height: PositiveInt = 64
    width: PositiveInt = 64


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    task: Literal["vae", "teacher", "stage1", "stage2", "consistency"]
    output_dir: str
    steps: PositiveInt
    batch_size: PositiveInt = Field(description="per rank")
    seed: int = 0
    # what to train: a preset name (transformer or VAE, by task) or a dict of config fields with an optional "preset"
    model: str | dict = "tiny"
    data: str | None = None  # latent shard folder (teacher, stage1)
    synthetic: SyntheticConfig = SyntheticConfig()  # vae
    vae: str | None = None  # trained VAE (pipeline or vae folder) that exports pair with (teacher, stage1)
    init_from: str | None = None  # stage1: the teacher; stage2, consistency: the student to start from (a stage-1
    #                               student, or a teacher the student is initialised from)
    teacher: str | None = None  # stage2: the real score (and the critic's start)
    optim: OptimConfig = OptimConfig()
    caption_dropout: float = 0.1  # teacher: keeps an unconditional prediction for guidance
    kl_weight: float = 1e-4  # vae
    foreground_weight: float = Field(1.0, ge=1.0)  # vae: weight of the moving shape's pixels (see distill.vae_train)
    student_gate: float = 0.25  # stage1: gate_value of the student's time mix (the teacher trains with gate 0)
    stage1: Stage1Settings = Stage1Settings()  # stage1 (and stage2's co-trained stage-1 loss)
    stage2: Stage2Settings = Stage2Settings()
    consistency: ConsistencySettings = ConsistencySettings()
    parallel: Literal["ddp", "fsdp"] = "ddp"
    precision: Literal["fp32", "bf16"] = "fp32"
    gradient_checkpointing: bool = False
    log_every: PositiveInt = 10
    save_every: PositiveInt = 100
    fps: float = 8.0  # of exported pipelines

    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        if self.task != "vae" and (self.data is None or self.vae is None):
            raise ValueError(f"task {self.task} needs `data` (latent shards) and `vae` (the VAE that encoded them)")
        if self.task in ("stage1", "stage2", "consistency") and self.init_from is None:
            raise ValueError(f"{self.task} needs `init_from`: the model it starts from")
        if self.task == "stage2" and self.teacher is None:
            raise ValueError("stage2 needs `teacher`: the real score")
        if self.task == "stage2" and "optim" not in self.model_fields_set:  # the spec's stage-2 optimizer
            self.optim = OptimConfig(lr=2e-6, betas=(0.0, 0.999), ema_decay=0.99)
        if self.task == "vae" and self.parallel == "fsdp":
            raise ValueError("the VAE trains under DDP only")
        return self


def load_config(path: str | os.PathLike) -> TrainConfig:
    text = Path(path).read_text()
    if str(path).endswith((".yaml", ".yml")):
        import yaml  # optional: JSON configs need nothing extra

        return TrainConfig.model_validate(yaml.safe_load(text))
    return TrainConfig.model_validate_json(text)


# -- processes ------------------------------------------------------------------------------------------------------


@dataclass
class World:
    rank: int
    size: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_reduce(self, x: Tensor) -> Tensor:
        if self.size > 1:
            x = x.clone()
            dist.all_reduce(x)
        return x

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()


def join_world() -> World:
    """The torchrun process group (nccl on GPUs, gloo on CPUs), or a world of one."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return World(dist.get_rank() if size > 1 else 0, size, device)


def step_generator(*key: int) -> torch.Generator:
    """A generator that depends on nothing but `key` (seed, step[, rank]): resumption needs no generator state."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence(list(key)).generate_state(1, np.uint64)[0] >> 1))


# -- tasks ----------------------------------------------------------------------------------------------------------


@dataclass
class Task:
    core: nn.Module  # what is optimised, unwrapped
    loader: Loader
    loss: Callable[[nn.Module, dict, int], tuple[Tensor, dict]]  # (wrapped net, batch, step) -> loss, stats
    export: Callable[[dict[str, Tensor], Path], None]  # (full EMA state of `core`, folder)
    phases: tuple[str, ...] = ("",)  # step s updates the parameters named with prefix phases[s % len(phases)]


def _config_fields(spec: str | dict) -> tuple[str | None, dict]:
    if isinstance(spec, str):
        return spec, {}
    fields = dict(spec)
    return fields.pop("preset", None), fields


def transformer_config(spec: str | dict) -> TransformerConfig:
    name, fields = _config_fields(spec)
    base = preset(name).model_dump() if name else {}
    return TransformerConfig(**{**base, **fields})


def vae_config(spec: str | dict) -> VaeConfig:
    name, fields = _config_fields(spec)
    base = vae_preset(name).model_dump() if name else {}
    return VaeConfig(**{**base, **fields})


def build_task(cfg: TrainConfig, world: World) -> Task:
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    if cfg.task == "vae":
        return _vae_task(cfg, world)
    shards = LatentShards(cfg.data)
    negative = shards.negative.to(world.device)
    loader = Loader(shards, cfg.batch_size, world.rank, world.size, cfg.seed)
    if cfg.task == "teacher":
        model = CausalWanTransformer(transformer_config(cfg.model).model_copy(update={"gate_value": 0.0}))

        def loss(net, batch, step):
            gen = step_generator(cfg.seed, step, world.rank)
            x0, embeds = batch["latents"].to(world.device), batch["prompt_embeds"].to(world.device)
            embeds, _ = drop_captions(embeds, negative, cfg.caption_dropout, gen)
            tokens = x0.shape[0] * math.prod(model.token_grid(x0, False))
            return flow_matching_loss(net, x0, embeds, gen), {"tokens": tokens}
    else:
        model = load_student(cfg.init_from, cfg.student_gate)
        global_batch = cfg.batch_size * world.size
        kinds = pair_kinds(global_batch, world.rank, cfg.batch_size, cfg.stage1.diffusion_share,
                           cfg.stage1.consistency_share)
        all_reduce = world.all_reduce if world.size > 1 else None

        def loss(net, batch, step):
            x0, embeds = batch["latents"].to(world.device), batch["prompt_embeds"].to(world.device)
            shared, local = step_generator(cfg.seed, step), step_generator(cfg.seed, step, world.rank)
            if cfg.task == "stage2":
                return net(x0, embeds, step % 2, shared, local)
            if cfg.task == "consistency":
                return net(x0, embeds, shared, local)
            return stage1_objective(net, x0, embeds, negative, cfg.stage1, kinds, shared, local, all_reduce)
    prefix, phases = "model.", ("",)
    if cfg.task == "stage2":
        teacher = load_transformer(cfg.teacher, torch.float32)
        core = Stage2(model, copy.deepcopy(teacher), teacher, negative, cfg.stage2, cfg.stage1, kinds, all_reduce)
        prefix, phases = "generator.model.", PHASES
    elif cfg.task == "consistency":
        core = Consistency(model, copy.deepcopy(model), cfg.consistency)
        prefix = "generator.model."
    else:
        core = Denoiser(model)
    for m in core.modules():
        if isinstance(m, CausalWanTransformer):
            m.gradient_checkpointing = cfg.gradient_checkpointing
            m.cuda_graphs.enabled = False  # weights change every step; graphs are for inference
    core = core.to(world.device)
    vae = WanVAE.from_pretrained(cfg.vae)
    encoder = WordHashEncoder(**{k: v for k, v in shards.index["text_encoder"].items() if k != "_class_name"})
    lat = shards.batch([0])["latents"]
    s, tf = vae.config.spatial_factor, vae.config.temporal_factor
    settings = PipelineSettings(height=lat.shape[3] * s, width=lat.shape[4] * s,
                                num_frames=1 + tf * (lat.shape[2] - 1), fps=cfg.fps)

    def export(state: dict[str, Tensor], folder: Path) -> None:
        ema = CausalWanTransformer(model.config)
        ema.load_state_dict({k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)})
        Pipeline(ema, vae, encoder, settings).save_pretrained(folder)

    return Task(core, loader, loss, export, phases)


def load_student(path: str, gate: float) -> CausalWanTransformer:
    """A causal student from a folder: taken as it is, or initialised from it when it is a teacher (gate 0)."""
    loaded = load_transformer(path, torch.float32)
    if loaded.config.gate_value != 0 or gate == 0:
        return loaded.train()
    student = CausalWanTransformer(loaded.config.model_copy(update={"gate_value": gate}))
    init_student_from_teacher(student, loaded.state_dict())
    return student


def _vae_task(cfg: TrainConfig, world: World) -> Task:
    vae = WanVAE(vae_config(cfg.model)).to(world.device)
    core = VaeObjective(vae)
    s = cfg.synthetic
    videos = SyntheticVideos(s.count, s.seed, s.frames, s.height, s.width)
    loader = Loader(videos, cfg.batch_size, world.rank, world.size, cfg.seed)

    def loss(net, batch, step):
        return net(batch["video"].to(world.device), step_generator(cfg.seed, step, world.rank), cfg.kl_weight,
                   cfg.foreground_weight)

    def export(state: dict[str, Tensor], folder: Path) -> None:
        ema = WanVAE(vae.config)
        ema.load_state_dict({k.removeprefix("vae."): v for k, v in state.items()})
        sample = videos.batch(list(range(min(len(videos), 32))))["video"]
        with_latent_stats(ema, sample).save_pretrained(folder / "vae")

    return Task(core, loader, loss, export)


# -- training -------------------------------------------------------------------------------------------------------


def wrap(core: nn.Module, cfg: TrainConfig, world: World) -> nn.Module:
    if cfg.parallel == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float32
        policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
        for model in [m for m in core.modules() if isinstance(m, CausalWanTransformer)]:
            for block in model.blocks:
                fully_shard(block, mp_policy=policy)
        return fully_shard(core, mp_policy=policy)
    if world.size > 1:
        # far_patch_embedding is unused on steps without compressed context; stage 2 steps use one of two nets
        return nn.parallel.DistributedDataParallel(core, find_unused_parameters=cfg.task != "teacher")
    return core


def _full_state(core: nn.Module, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Full CPU copies of (possibly FSDP-sharded) tensors; a collective under FSDP (every rank calls it)."""
    from torch.distributed.tensor import DTensor

    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().cpu().clone() for k, v in tensors.items()}


def save_checkpoint(run_dir: Path, step: int, core, optimizers, ema, loader, task: Task, world: World) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = get_model_state_dict(core, options=options)
    optim_state = [get_optimizer_state_dict(core, o, options=options) for o in optimizers]
    ema_state = _full_state(core, ema)
    rng = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}
    rngs = [None] * world.size
    if world.size > 1:
        dist.all_gather_object(rngs, rng)
    else:
        rngs = [rng]
    if world.main:
        final = run_dir / "checkpoints" / f"step-{step:07d}"
        tmp = final.with_name(final.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        torch.save({"step": step, "model": model_state, "optimizer": optim_state, "ema": ema_state, "rng": rngs,
                    "loader": loader.state_dict()}, tmp / STATE_NAME)
        task.export(ema_state, tmp / "model")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        latest = run_dir / "checkpoints" / "latest"
        latest.with_suffix(".tmp").write_text(final.name)
        os.replace(latest.with_suffix(".tmp"), latest)
    world.barrier()


def load_checkpoint(run_dir: Path, core, optimizers, ema, loader, world: World) -> int:
    """Restore the newest checkpoint, if any; returns the step to continue from."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict
    from torch.distributed.tensor import DTensor, distribute_tensor

    latest = run_dir / "checkpoints" / "latest"
    if not latest.is_file():
        return 0
    state = torch.load(run_dir / "checkpoints" / latest.read_text() / STATE_NAME, weights_only=True)
    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(core, state["model"], options=options)
    saved = state["optimizer"]
    for o, s in zip(optimizers, [saved] if isinstance(saved, dict) else saved):  # a dict: one optimizer (older)
        set_optimizer_state_dict(core, o, s, options=options)
    with torch.no_grad():
        for k, e in ema.items():
            full = state["ema"][k].to(world.device)
            e.copy_(distribute_tensor(full, e.device_mesh, e.placements) if isinstance(e, DTensor) else full)
    rng = state["rng"][world.rank]
    torch.set_rng_state(rng["cpu"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    loader.load_state_dict(state["loader"])
    return int(state["step"])


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


class Log:
    """Rank 0's progress: one line per report on stdout and one JSON object per report in `log.jsonl`."""

    def __init__(self, run_dir: Path, task: str, total: int, start: int, enabled: bool):
        self.path, self.task, self.total, self.enabled = run_dir / "log.jsonl", task, total, enabled
        self.t0, self.start = time.perf_counter(), start
        if enabled and self.path.exists():  # a resumed run repeats the steps after its checkpoint: drop their lines
            kept = [line for line in self.path.read_text().splitlines() if json.loads(line)["step"] <= start]
            self.path.write_text("".join(line + "\n" for line in kept))

    def report(self, step: int, record: dict) -> None:
        if not self.enabled:
            return
        done = step - self.start
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / max(done, 1) * (self.total - step)
        bar = "#" * int(20 * step / self.total)
        tput = f"{record['samples_per_s']:.1f} samples/s"
        if record.get("tokens_per_s"):
            tput += f" {record['tokens_per_s'] / 1e3:.1f}k tokens/s"
        print(f"[{self.task}] [{bar:<20}] {step}/{self.total} loss {record['loss']:.4f} lr {record['lr']:.2e} | "
              f"{tput} | mem {record['memory_gb']:.2f} GB | eta {eta:.0f}s", flush=True)
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **record}) + "\n")


def train(cfg: TrainConfig, kill_after: int | None = None) -> Path:
    """Train (resuming from the newest checkpoint in `output_dir`), export `output_dir/model`, return that folder."""
    world = join_world()
    run_dir = Path(cfg.output_dir)
    if world.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(cfg.model_dump_json(indent=2))
    model_module.set_fused_kernels(False)  # autograd takes the torch path; keep the no-grad evaluations on it too
    task = build_task(cfg, world)
    core = task.core
    net = wrap(core, cfg, world)
    named = [(n, p) for n, p in core.named_parameters() if p.requires_grad]
    ema = {n: p.detach().clone().float() for n, p in named}
    groups = [[(ema[n], p) for n, p in named if n.startswith(prefix)] for prefix in task.phases]
    optimizers = [torch.optim.AdamW([p for _, p in g], lr=cfg.optim.lr, betas=cfg.optim.betas,
                                    weight_decay=cfg.optim.weight_decay) for g in groups]
    start = load_checkpoint(run_dir, core, optimizers, ema, task.loader, world)
    log = Log(run_dir, cfg.task, cfg.steps, start, world.main)
    autocast = (torch.autocast(world.device.type, torch.bfloat16)
                if cfg.precision == "bf16" and cfg.parallel == "ddp" else nullcontext())
    window = {"loss": 0.0, "n": 0, "samples": 0, "tokens": 0, "t": time.perf_counter()}
    for step in range(start, cfg.steps):
        lr = cfg.optim.lr * min(1.0, (step + 1) / max(cfg.optim.warmup_steps, 1))
        optimizer, params = optimizers[step % len(groups)], [p for _, p in groups[step % len(groups)]]
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = task.loader.next()
        with autocast:
            loss, stats = task.loss(net, batch, step)
        loss.backward()
        for p in params:  # unused this step (far_patch_embedding without compressed context): a zero gradient, so
            if p.grad is None:  # optimizer state never depends on how DDP reported unused parameters (it differs on
                p.grad = torch.zeros_like(p)  # the first iteration after a restart)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
        optimizer.step()
        for o in optimizers:  # the other phases' parameters may have gradients too (unused ones zero-filled by DDP)
            o.zero_grad(set_to_none=True)
        with torch.no_grad():
            for e, p in groups[step % len(groups)]:  # per tensor: sharded (DTensor) parameters lerp locally
                e.lerp_(p.detach().float(), 1 - cfg.optim.ema_decay)
        window["loss"] += float(loss.detach())
        window["n"] += 1
        window["samples"] += cfg.batch_size * world.size
        window["tokens"] += stats.get("tokens", 0) * world.size
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            if world.device.type == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - window["t"]
            mean_loss = float(world.all_reduce(torch.tensor(window["loss"] / window["n"], device=world.device)))
            grad = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
            log.report(step + 1, {
                "loss": mean_loss / world.size, "lr": lr, "grad_norm": float(grad),
                "samples_per_s": window["samples"] / seconds, "tokens_per_s": window["tokens"] / seconds,
                "memory_gb": peak_memory_gb(world.device),
                **{k: v for k, v in stats.items() if k != "tokens"},
            })
            window = {"loss": 0.0, "n": 0, "samples": 0, "tokens": 0, "t": time.perf_counter()}
        if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps:
            save_checkpoint(run_dir, step + 1, core, optimizers, ema, task.loader, task, world)
            if kill_after == step + 1:
                os._exit(0)  # a crash right after this checkpoint: nothing below runs, no clean-up
    final = run_dir / "model"
    if world.main:
        latest = run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text() / "model"
        tmp = final.with_name("model.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(latest, tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    world.barrier()
    model_module.set_fused_kernels(True)
    return final


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m distill.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="JSON (or YAML) TrainConfig")
    parser.add_argument("--kill-after", type=int, help="(tests) exit abruptly right after the checkpoint of this step")
    args = parser.parse_args(argv)
    train(load_config(args.config), args.kill_after)
    if dist.is_initialized():
        dist.destroy_process_group()
        # Everything is written and every rank passed the final barrier. What is left is C++ teardown at exit, where
        # a rank sometimes aborts on its own ("terminate called without an active exception" after Python has
        # finalized: 2 of about 60 two-process CPU runs here, 0 of 80 since), failing a finished job: skip it.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
