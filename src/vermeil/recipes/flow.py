"""The flow task: a small Flux learns to carry a condition sequence to a target sequence with rectified flow,
trained by `vermeil.train.Trainer` (a run config with `data: {task: flow}`, or `train_flow_job` ->
`sample_flow_job` -> `plot_flow_job`); `make_batch` names the jobs."""

# Shapes: B batch, L points per sequence, Cc condition channels (2), C target channels (3 or 2), A = 3 id axes.

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor, nn

from vermeil.config import ConfigError, to_dict
from vermeil.data.points import DISTRIBUTIONS, paired_sequences
from vermeil.data.sampler import SeededSampler
from vermeil.diffusion.losses import flow_matching_loss, sample_flow_timesteps
from vermeil.diffusion.samplers import sample_euler, sample_heun
from vermeil.diffusion.schedules import get_schedule
from vermeil.nn.checks import check_positive_ints
from vermeil.recipes.tasks import EVAL_SEED_OFFSET, Run, TaskData
from vermeil.train.config import TrainConfig
from vermeil.train.hooks import Hook, TrainResult

if TYPE_CHECKING:
    from vermeil.models.flux import Flux, FluxParams
    from vermeil.recipes.config import Family, RunConfig
    from vermeil.train.trainer import Trainer

__all__ = [
    "FlowData",
    "FlowJobResult",
    "FlowJobSample",
    "curve_pairs",
    "flow_job_figure",
    "flow_job_params",
    "flow_loss",
    "flow_sampler",
    "flux_model_fn",
    "make_batch",
    "plot_flow_job",
    "sample_flow_job",
    "sample_run",
    "sliced_wasserstein",
    "train_flow_job",
    "zero_init_output",
]

Job = Literal["curves", "points"]

SAMPLE_SEED_OFFSET = 2_000_003  # the samples of an evaluation: `train.seed + offset`, as EVAL_SEED_OFFSET


def curve_pairs(
    batch: int, length: int, generator: torch.Generator | None = None, *, noise: float = 0.02
) -> tuple[Tensor, Tensor]:
    """Paired sequences: a noisy 2-D circle c + a (cos t, sin t) (condition) and the matching 3-D trefoil
    a (sin t + 2 sin 2t, cos t - 2 cos 2t, -sin 3t) / 3 (target), t_i = phi + 2 pi i / L.

    The target is a function of the whole condition (phi and a are read from all points, the centre c ignored).
    Returns cond (B, L, 2), data (B, L, 3), float32.
    """
    check_positive_ints(batch=batch, length=length)
    phi = torch.rand(batch, 1, generator=generator) * 2 * math.pi
    scale = 0.6 + 0.8 * torch.rand(batch, 1, generator=generator)  # a in [0.6, 1.4]
    centre = 0.5 * torch.randn(batch, 1, 2, generator=generator)
    t = phi + 2 * math.pi * torch.arange(length) / length  # (B, L)
    circle = torch.stack((t.cos(), t.sin()), dim=-1) * scale[..., None] + centre
    cond = circle + noise * torch.randn(batch, length, 2, generator=generator)
    knot = torch.stack(
        ((t.sin() + 2 * (2 * t).sin()) / 3, (t.cos() - 2 * (2 * t).cos()) / 3, -(3 * t).sin()), dim=-1
    )
    return cond, knot * scale[..., None]


def make_batch(
    task: Job, batch: int, length: int, generator: torch.Generator | None = None, **kwargs: Any
) -> tuple[Tensor, Tensor]:
    """(cond (B, L, Cc), data (B, L, C)) for `task`; kwargs go to the generator (source/target for "points")."""
    match task:
        case "curves":
            return curve_pairs(batch, length, generator, **kwargs)
        case "points":
            return paired_sequences(batch, length, generator, **kwargs)
        case _:
            raise ValueError(f"task={task!r} must be 'curves' or 'points'")


def _channels(task: Job) -> tuple[int, int]:
    return (2, 3) if task == "curves" else (2, 2)


def _ids(length: int, stream: int, device: torch.device | str | None = None) -> Tensor:
    """(1, L, 3) ids: (stream 0 condition / 1 data, index i shared by both streams for RoPE, 0)."""
    ids = torch.zeros(1, length, 3, device=device)
    ids[..., 0] = stream
    ids[..., 1] = torch.arange(length, device=device)
    return ids


def sliced_wasserstein(
    x: Tensor, y: Tensor, projections: int = 128, generator: torch.Generator | None = None
) -> Tensor:
    """Sliced Wasserstein-1 distance between point clouds x (N, C) and y (N, C) (same N): mean over random
    directions of the mean |sorted(x.u) - sorted(y.u)|."""
    if x.shape != y.shape or x.ndim != 2:
        raise ValueError(f"x {tuple(x.shape)} and y {tuple(y.shape)} must both be (N, C)")
    u = torch.randn(x.shape[1], projections, generator=generator, dtype=x.dtype)
    u = u / u.norm(dim=0, keepdim=True)
    return ((x @ u).sort(dim=0).values - (y @ u).sort(dim=0).values).abs().mean()


def flow_job_params(
    task: Job = "curves",
    *,
    hidden_size: int = 64,
    num_heads: int = 4,
    depth: int = 2,
    depth_single_blocks: int = 2,
) -> FluxParams:
    """A small Flux for the job: Dh = hidden_size / num_heads split over 3 id axes (Dh - 4k, 2k, 2k), k = Dh // 6.

    ValueError naming hidden_size and num_heads unless Dh is an even int >= 6 (each axis needs >= 2 channels).
    """
    from vermeil.models.flux import FluxParams

    cond_ch, data_ch = _channels(task)
    check_positive_ints(hidden_size=hidden_size, num_heads=num_heads)
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size={hidden_size} must be divisible by num_heads={num_heads}")
    head_dim = hidden_size // num_heads
    if head_dim < 6 or head_dim % 2:
        raise ValueError(
            f"hidden_size={hidden_size} / num_heads={num_heads} = {head_dim} channels per head: the flow job "
            "splits them over 3 id axes of >= 2 channels each, so hidden_size / num_heads must be even and >= 6"
        )
    axes = [2 * (head_dim // 6), 2 * (head_dim // 6)]
    axes = [head_dim - sum(axes), *axes]
    return FluxParams(
        in_channels=data_ch,
        out_channels=data_ch,
        vec_in_dim=cond_ch,  # y = mean of the condition points
        context_in_dim=cond_ch,
        hidden_size=hidden_size,
        mlp_ratio=4.0,
        num_heads=num_heads,
        depth=depth,
        depth_single_blocks=depth_single_blocks,
        axes_dim=axes,
        theta=10_000,
        qkv_bias=True,
        guidance_embed=False,
    )


def flux_model_fn(model: Flux, cond: Tensor) -> Callable[..., Tensor]:
    """model_fn(x, t) for the samplers and the loss: the condition, its ids and y fixed (ids on cond's device)."""
    cond_ids, y = _ids(cond.shape[1], 0, cond.device), cond.mean(dim=1)

    def fn(x: Tensor, t: Tensor) -> Tensor:
        return model(x, _ids(x.shape[1], 1, x.device), cond, cond_ids, t, y)

    return fn


def zero_init_output(model: Flux) -> None:
    """Start as a zero velocity (adaLN-Zero style output layer): steadier early training than BFL's default."""
    torch.nn.init.zeros_(model.final_layer.linear.weight)
    torch.nn.init.zeros_(model.final_layer.linear.bias)


@dataclass
class FlowData(TaskData):
    """The flow task of a run config.

    Args:
        job: "curves" (`curve_pairs`) or "points" (`paired_sequences`); `FlowJobSample` says their distances.
        length: L points per sequence (condition and target alike).
        source, target: the shapes of the "points" job.
        noise: the condition noise of the "curves" job.
        time_sampling: flow times during training ("logit_normal" as SD3).
        sample_steps: Euler steps when evaluating and in `vermeil sample`.
        eval_samples: sequences generated per evaluation.
    """

    task: Literal["flow"] = "flow"
    job: Literal["curves", "points"] = "curves"
    length: int = 16
    source: str = "moons"
    target: str = "rings"
    noise: float = 0.02
    time_sampling: Literal["uniform", "logit_normal"] = "logit_normal"
    sample_steps: int = 32
    eval_samples: int = 256

    def __post_init__(self) -> None:
        for name in ("source", "target"):
            value = getattr(self, name)
            if value not in DISTRIBUTIONS:
                raise ValueError(f"{name}={value!r} must be one of {sorted(DISTRIBUTIONS)}")
        check_positive_ints(
            length=self.length, sample_steps=self.sample_steps, eval_samples=self.eval_samples
        )
        if self.noise < 0:
            raise ValueError(f"noise={self.noise!r} must be >= 0")

    @property
    def channels(self) -> tuple[int, int]:  # (condition, target)
        return _channels(self.job)

    @property
    def vocab_size(self) -> int:
        return 0  # points, not tokens

    # What loss.png's y axis shows for this task (`vermeil.train.hooks.LossCurve`).
    loss_label = "flow-matching loss (MSE of the velocity)"

    @property
    def model_sequence_length(self) -> int:
        """Condition and target points, one joint sequence (what `vermeil info` counts FLOPs at)."""
        return 2 * self.length

    def job_kwargs(self) -> dict[str, Any]:  # the extra arguments of `make_batch`
        return (
            {"noise": self.noise} if self.job == "curves" else {"source": self.source, "target": self.target}
        )

    def complete_model(
        self, family: Family, user: Mapping[str, Any], presets: Mapping[str, Any]
    ) -> dict[str, Any]:
        """Without a preset, start from `flow_job_params` (its axes_dim fits the head size, unless the config
        sets axes_dim); the job sets the channels the config leaves out."""
        if "preset" in user:
            merged = super().complete_model(family, user, presets)
        else:
            keys = ("depth", "depth_single_blocks")
            if (
                "axes_dim" not in user
            ):  # a given axes_dim (a converted Flux's) need not follow the job's split
                keys += ("hidden_size", "num_heads")
            # A value of the wrong type is left to the strict converter, which names the key and the type.
            shape = {k: user[k] for k in keys if type(user.get(k)) is int}
            try:
                base = to_dict(flow_job_params(self.job, **shape))
            except (TypeError, ValueError) as e:
                raise ConfigError(f"model: {e}") from None
            merged = {**base, **user}
        cond_ch, data_ch = self.channels
        io = dict(in_channels=data_ch, out_channels=data_ch, context_in_dim=cond_ch, vec_in_dim=cond_ch)
        return {**merged, **{k: v for k, v in io.items() if k not in user}}

    @classmethod
    def for_model(cls, model_config: Any) -> FlowData:
        """The job whose channels fit a converted Flux: "points" for 2 channels everywhere, else "curves"."""
        p = model_config
        io = (p.context_in_dim, p.vec_in_dim, p.in_channels, p.out_channels)
        return cls(job="points") if io == (2, 2, 2, 2) else cls()

    def init_model(self, model: nn.Module) -> None:
        zero_init_output(model)  # type: ignore[arg-type]

    def check_model(self, params: FluxParams) -> None:
        """ConfigError naming the model key that this job cannot train or sample: channels other than the job's,
        an axes_dim without the job's 3 id axes, a guidance embedding. Converted runs may hold such models."""
        cond_ch, data_ch = self.channels
        need = dict(in_channels=data_ch, out_channels=data_ch, context_in_dim=cond_ch, vec_in_dim=cond_ch)
        for key, value in need.items():
            if getattr(params, key) != value:
                raise ConfigError(
                    f"model.{key}={getattr(params, key)} does not fit data.job={self.job!r}, which needs "
                    f"{value} (condition {cond_ch} and target {data_ch} channels per point)"
                )
        if len(params.axes_dim) != 3:
            raise ConfigError(
                f"model.axes_dim={list(params.axes_dim)} must have 3 entries: the flow job's ids have 3 axes "
                "(stream, point index, 0)"
            )
        if params.guidance_embed:
            raise ConfigError("model.guidance_embed=true: the flow job trains and samples without guidance")

    def build(self, run: RunConfig, model: nn.Module) -> Run:
        """Seeded batches and the rectified-flow loss; eval: the loss on fixed batches, noise and times, and the
        distance of generated samples; `samples.png` at the end."""
        self.check_model(run.model)
        train = run.train
        sampler = flow_sampler(self, train.batch_size, train.seed)
        eval_gen = torch.Generator().manual_seed(train.seed + EVAL_SEED_OFFSET)
        val = [
            next(flow_sampler(self, train.batch_size, train.seed + EVAL_SEED_OFFSET + i))
            for i in range(train.eval_batches)
        ]
        val_noise = [torch.randn(v[1].shape, generator=eval_gen) for v in val]
        # Times from the training distribution: the validation loss estimates the training objective (the loss
        # per time spans orders of magnitude between t near 0 and 1).
        val_t = [sample_flow_timesteps(v[1].shape[0], self.time_sampling, generator=eval_gen) for v in val]

        def eval_fn(m: nn.Module) -> dict[str, float]:
            device = _device_of(m)
            losses = []
            for (c, x), n, t in zip(val, val_noise, val_t):
                fn = flux_model_fn(m, c.to(device))  # type: ignore[arg-type]
                losses.append(float(flow_matching_loss(fn, x.to(device), noise=n.to(device), t=t.to(device))))
            sample = self.sample(m, seed=train.seed + SAMPLE_SEED_OFFSET)
            return {"val_loss": sum(losses) / len(losses), "val_distance": sample.distance}

        loss_fn = partial(flow_loss, time_sampling=self.time_sampling)
        return Run(run, model, sampler, loss_fn, eval_fn, hooks=[_SamplesAtEnd(self)])

    def sample(
        self, model: nn.Module, *, seed: int, num_samples: int | None = None, steps: int | None = None
    ) -> FlowJobSample:
        """`sample_flow_job` on this job's data (`eval_samples` sequences, `sample_steps` steps by default)."""
        num_samples = self.eval_samples if num_samples is None else num_samples
        steps = self.sample_steps if steps is None else steps
        check_positive_ints(num_samples=num_samples, steps=steps)  # 0 is an error, not the default
        return sample_flow_job(
            model,  # type: ignore[arg-type]
            num_samples,
            seed=seed,
            sample_steps=steps,
            task=self.job,
            length=self.length,
            data_kwargs=self.job_kwargs(),
        )


def _device_of(model: nn.Module) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def flow_sampler(data: FlowData, batch_size: int, seed: int) -> SeededSampler:
    """An endless, seeded stream of (cond (B, L, Cc), data (B, L, C)) batches of a flow config; resumable."""
    return SeededSampler(
        partial(make_batch, data.job), batch_size, seed, length=data.length, **data.job_kwargs()
    )


def flow_loss(
    model: nn.Module, batch: tuple[Tensor, Tensor], *, time_sampling: str = "logit_normal"
) -> Tensor:
    """Rectified-flow loss of a Flux on (cond, data); noise and times come from the global RNG (checkpointed)."""
    cond, data = batch
    return flow_matching_loss(flux_model_fn(model, cond), data, kind=time_sampling)  # type: ignore[arg-type]


@dataclass
class FlowJobResult:
    """A trained job: the model (eval mode), its params, the loss per step, the settings used."""

    model: Flux
    params: FluxParams
    losses: list[float]
    config: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


@dataclass
class FlowJobSample:
    """cond (B, L, Cc), true target and generated (B, L, C); distance: mean per-point Euclidean error ("curves")
    or sliced Wasserstein-1 of the point clouds ("points")."""

    cond: Tensor
    target: Tensor
    generated: Tensor
    distance: float
    task: str = "curves"


def train_flow_job(
    steps: int = 1500,
    seed: int = 0,
    *,
    task: Job = "curves",
    length: int = 16,
    batch_size: int = 64,
    lr: float = 2e-3,
    warmup: int = 50,
    time_sampling: Literal["uniform", "logit_normal"] = "logit_normal",
    params: FluxParams | None = None,
    data_kwargs: dict[str, Any] | None = None,
    log_every: int = 0,
    log: Callable[[str], None] = print,
    threads: int | None = None,
) -> FlowJobResult:
    """Train a small Flux with the rectified-flow loss through `vermeil.train.Trainer` (AdamW without weight
    decay, warm-up then cosine decay to 10%, gradients clipped at 1).

    Args:
        seed: fixes the weights, the data stream and the noise.
        params: default `flow_job_params(task)`.
        data_kwargs: extra arguments of `make_batch` (source/target shapes for "points").
        log_every: print the mean loss every this many steps (0: silent).
        threads: torch intra-op threads while training, restored afterwards (None: unchanged). A model this
            small runs fastest on 1 thread.
    """
    from vermeil.models.flux import Flux
    from vermeil.train.trainer import Trainer

    params = params or flow_job_params(task)
    config = TrainConfig(  # checks steps, batch_size, lr, ... before anything is built
        steps=steps,
        lr=lr,
        warmup=warmup,
        min_lr_ratio=0.1,
        weight_decay=0.0,
        betas=(0.9, 0.999),  # AdamW's defaults: this small model needs no LLM-style beta2
        grad_clip=1.0,
        batch_size=batch_size,
        seq_len=length,
        eval_every=0,
        log_every=log_every or steps,
        save_every=0,
        seed=seed,
        progress=False,
        plot=False,
    )
    with _threads(threads):
        torch.manual_seed(seed)  # the weights, then the flow noise and times of every step
        model = Flux(params)
        zero_init_output(model)
        batches = SeededSampler(
            partial(make_batch, task), batch_size, seed, length=length, **(data_kwargs or {})
        )
        record = _RecordLosses(log_every, log)
        loss_fn = partial(flow_loss, time_sampling=time_sampling)
        start = time.perf_counter()
        Trainer(model, batches, loss_fn, config, hooks=[record], tokenizer=None).fit()  # points, not tokens
        seconds = time.perf_counter() - start
    model.eval()
    settings = dict(
        steps=steps,
        seed=seed,
        task=task,
        length=length,
        batch_size=batch_size,
        lr=lr,
        time_sampling=time_sampling,
        data_kwargs=dict(data_kwargs or {}),
    )
    return FlowJobResult(model, params, record.losses, settings, seconds)


class _RecordLosses(Hook):
    """Keep every step's loss (one host sync per step) and print the mean every `log_every` steps."""

    def __init__(self, log_every: int, log: Callable[[str], None]) -> None:
        self.log_every, self.log, self.losses = log_every, log, []

    def on_step_end(self, trainer: Trainer, step: int, loss: Tensor) -> None:
        self.losses.append(float(loss))
        if self.log_every and step % self.log_every == 0:
            recent = self.losses[-self.log_every :]
            lr = trainer.scheduler.get_last_lr()[0]
            self.log(f"step {step}/{trainer.config.steps}  loss {sum(recent) / len(recent):.4f}  lr {lr:.2e}")


@contextmanager
def _threads(threads: int | None) -> Iterator[None]:
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@torch.no_grad()
def sample_flow_job(
    result: FlowJobResult | Flux,
    num_samples: int = 256,
    *,
    seed: int = 1234,
    sample_steps: int = 32,
    sampler: Literal["euler", "heun"] = "euler",
    task: Job | None = None,
    length: int | None = None,
    data_kwargs: dict[str, Any] | None = None,
    threads: int | None = None,
) -> FlowJobSample:
    """Generate targets for fresh conditions and measure the distance to the true targets.

    Args:
        result: a FlowJobResult (its task, length and data settings reused) or a bare Flux (then task and length
            default to "curves" and 16).
        seed: the evaluation data and noise (distinct from the training stream by default).
        sample_steps: K flow steps on the unshifted grid linspace(1, 0, K + 1).
    """
    model, config = (result.model, result.config) if isinstance(result, FlowJobResult) else (result, {})
    task = task or config.get("task", "curves")
    length = config.get("length", 16) if length is None else length
    data_kwargs = data_kwargs if data_kwargs is not None else config.get("data_kwargs", {})
    gen = torch.Generator().manual_seed(seed)
    cond, target = make_batch(task, num_samples, length, gen, **data_kwargs)
    noise = torch.randn(target.shape, generator=gen)
    timesteps = get_schedule(sample_steps, length, shift=False)
    samplers = {"euler": sample_euler, "heun": sample_heun}
    if sampler not in samplers:
        raise ValueError(f"sampler={sampler!r} must be one of {sorted(samplers)}")
    run = samplers[sampler]
    device = _device_of(model)
    was_training = model.training
    model.eval()
    with _threads(threads):
        # Drawn on the CPU (the same numbers on any device), sampled on the model's, measured on the CPU. The
        # time grid stays on the CPU: the sampler reads it to the host once (its steps are Python floats).
        generated = run(flux_model_fn(model, cond.to(device)), noise.to(device), timesteps).cpu()
    model.train(was_training)
    if task == "curves":
        distance = (generated - target).norm(dim=-1).mean().item()
    else:
        sw_gen = torch.Generator().manual_seed(seed + 1)
        distance = sliced_wasserstein(generated.flatten(0, 1), target.flatten(0, 1), generator=sw_gen).item()
    return FlowJobSample(cond, target, generated, distance, task)


def flow_job_figure(sample: FlowJobSample, *, rows: int = 3) -> Any:
    """The matplotlib Figure `plot_flow_job` saves: per row condition, true and generated target of one sample;
    colour is the point index (2-D) or the third coordinate (3-D, one scale for true and generated)."""
    import matplotlib  # an optional extra

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    rows = min(rows, sample.cond.shape[0])
    columns = (("condition", sample.cond), ("target", sample.target), ("generated", sample.generated))
    # True and generated 3-D targets share one colour scale.
    z = [c[:rows, :, 2].detach().cpu() for _, c in columns[1:] if c.shape[-1] > 2]
    fig, axes = plt.subplots(rows, 3, figsize=(9, 3 * rows + 0.8), squeeze=False)
    for c, (title, points) in enumerate(columns):
        is_3d = points.shape[-1] > 2
        for r in range(rows):
            ax = axes[r][c]
            pts = points[r].detach().cpu()
            if is_3d:
                colour, lo, hi = pts[:, 2], min(float(t.min()) for t in z), max(float(t.max()) for t in z)
            else:
                colour, lo, hi = torch.arange(pts.shape[0]), 0, pts.shape[0] - 1
            ax.plot(pts[:, 0], pts[:, 1], color="0.8", lw=0.8, zorder=0)  # the sequence order
            mapped = ax.scatter(pts[:, 0], pts[:, 1], c=colour, cmap="viridis", s=14, vmin=lo, vmax=hi)
            ax.set_aspect("equal")
            ax.set_title(title if r == 0 else "")
            ax.set_xticks([])
            ax.set_yticks([])
        label = "colour: third coordinate (z)" if is_3d else "colour: point index in the sequence"
        fig.colorbar(mapped, ax=list(axes[:, c]), location="bottom", shrink=0.8, pad=0.04, label=label)
    fig.suptitle(f"{sample.task}: distance {sample.distance:.3f}")
    return fig


def plot_flow_job(sample: FlowJobSample, path: str | Path, *, rows: int = 3) -> Path:
    """Write `flow_job_figure(sample, rows=rows)` as a PNG. Needs matplotlib (extra "plot")."""
    import matplotlib.pyplot as plt

    fig = flow_job_figure(sample, rows=rows)
    path = Path(path)
    try:
        fig.savefig(path, dpi=100, bbox_inches="tight")
    finally:
        plt.close(fig)
    return path


def sample_run(
    run: RunConfig,
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    steps: int | None = None,
    guidance: float | None = None,
    seed: int = 0,
    num_samples: int | None = None,
) -> float:
    """Sample a trained flow run into a PNG; returns the distance to the true targets."""
    if not isinstance(run.data, FlowData):
        raise ValueError(f"sampling needs a flow run (data.task=flow), got data.task={run.data.task!r}")
    if guidance is not None:
        raise ValueError(
            f"guidance={guidance} needs a guidance-distilled model (model.guidance_embed=true); "
            "the flow job trains without one"
        )
    run.data.check_model(run.model)
    sample = run.data.sample(model, seed=seed, num_samples=num_samples, steps=steps)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    plot_flow_job(sample, path)
    return sample.distance


class _SamplesAtEnd(Hook):
    """Write `samples.png` into the run folder when a flow run finishes (not when it was interrupted)."""

    def __init__(self, data: FlowData) -> None:
        self.data = data

    def on_train_end(self, trainer: Trainer, result: TrainResult) -> None:
        if trainer.out_dir is None or result.interrupted or not trainer.config.plot:
            return
        # Under a distributed strategy every rank samples (the forward may hold collectives); rank 0 writes.
        sample = self.data.sample(trainer.model, seed=0)
        if not getattr(trainer, "is_main", True):
            return
        try:
            plot_flow_job(sample, trainer.out_dir / "samples.png")
        except ImportError:
            return  # no matplotlib: the loss curve step already said so
        print(
            f"samples.png: distance {sample.distance:.4f} (vermeil sample {trainer.out_dir} draws more)",
            file=sys.stderr,
        )
