"""The `vermeil` command (also `python -m vermeil`): train, generate, sample, info, compare, convert.

Each subcommand parses its flags, builds a config with `vermeil.recipes` and calls library functions. Errors a
user can cause print one line, `vermeil <command>: error: ...`, on stderr and exit with status 2 (`--debug`
shows the traceback instead).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import inspect
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["main"]

EXIT_ERROR = 2
EXIT_NONFINITE = 1  # the run diverged (a non-finite loss or gradient): not a usage error
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE: what a shell reports for a command whose reader left (`| head -1`)


class CommandError(Exception):
    """A user-facing error of a subcommand: printed as one line, no traceback."""


def _human(n: float, unit: str = "") -> str:
    for prefix in ("", "K", "M", "G", "T", "P"):
        if abs(n) < 1000:
            return f"{n:.3g} {prefix}{unit}".rstrip()
        n /= 1000
    return f"{n:.3g} E{unit}"


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.4g} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return f"{n:.4g} TiB"


def cmd_train(args: argparse.Namespace) -> int:
    """Train a model from a run config, or continue a run (--resume).

    One trainer at a time writes a run folder; a damaged checkpoint is named and the newest intact one used.
    A non-finite loss or gradient stops the run with exit status 1 (train.on_nonfinite=skip skips the step).
    """
    from vermeil.recipes import load_run_config, read_run_dir_config
    from vermeil.runs import CHECKPOINTS_DIR, latest_checkpoint, lock_run, refuse_existing_run
    from vermeil.train import keep_freed_memory

    if not args.default_malloc:
        keep_freed_memory()  # big tensors are not page-faulted in again every step (vermeil.train.allocator)
    config, overrides = args.config, list(args.overrides)
    # `vermeil train --resume RUN key=value`: argparse puts the first override in the CONFIG slot.
    if config is not None and "=" in config and not Path(config).exists():
        config, overrides = None, [config, *overrides]
    # Under torchrun every rank runs this; only rank 0 touches the folder and talks (no process group yet).
    main_rank = int(os.environ.get("RANK", "0")) == 0
    resume_from = None  # the run folder (its newest checkpoint), or one checkpoint folder of it
    if args.resume is not None:
        run_dir = resume_from = Path(args.resume)
        if run_dir.is_file():
            raise CommandError(
                f"--resume takes a run folder; {os.fspath(run_dir)} is a file (to start a run from a config: "
                f"vermeil train {os.fspath(run_dir)})"
            )
        if (
            latest_checkpoint(run_dir) == run_dir
        ):  # one checkpoint folder: the run goes on in the folder above
            if run_dir.resolve().parent.name != CHECKPOINTS_DIR:
                raise CommandError(
                    f"--resume takes a run folder; {os.fspath(run_dir)} is a checkpoint folder outside a run's "
                    f"{CHECKPOINTS_DIR}/ folder, so there is no run to continue in it"
                )
            run_dir = run_dir.resolve().parent.parent
        if args.out is not None and Path(args.out).resolve() != run_dir.resolve():
            raise CommandError("--out cannot be combined with --resume (a run resumes in its own folder)")
        run = load_run_config(config, overrides) if config else read_run_dir_config(run_dir, overrides)
    else:
        if config is None:
            raise CommandError("a CONFIG file is required (or --resume RUN_DIR)")
        run = load_run_config(config, overrides)
        run_dir = Path(args.out or run.train.out_dir or Path("runs") / (run.name or Path(config).stem))
        if not args.overwrite:
            refuse_existing_run(
                run_dir,
                resume=f"`vermeil train --resume {os.fspath(run_dir)}`",
                start_over="pass --out NEW_DIR, or --overwrite to start over there",
            )
    _check_device(run.train.device)
    with lock_run(run_dir) if main_rank else contextlib.nullcontext():  # before --overwrite clears anything
        return _train(args, run, run_dir, main_rank, resume_from)


def _check_device(device: str) -> None:
    import torch

    kind = torch.device(device).type
    if kind == "cuda" and not torch.cuda.is_available():
        build = "a CPU-only torch build" if torch.version.cuda is None else "no CUDA device is visible"
        raise CommandError(f"train.device={device!r} but {build}: use train.device=cpu")


def _train(
    args: argparse.Namespace, run: Any, run_dir: Path, main_rank: bool, resume_from: Path | None
) -> int:
    from vermeil.recipes import build_run
    from vermeil.runs import clear_run
    from vermeil.train import Trainer
    from vermeil.train.trainer import NonFiniteError

    say = print if main_rank else (lambda *a, **k: None)
    run.train.out_dir = os.fspath(run_dir)
    built = build_run(run)
    n_params = sum(p.numel() for p in built.model.parameters())
    trainer = Trainer(
        built.model,
        built.train_batches,
        built.loss_fn,
        run.train,
        eval_fn=built.eval_fn,
        run_config=run.to_dict(),
        out_dir=run_dir,
        hooks=built.hooks,
        tokenizer="bytes" if run.data.vocab_size else None,  # the flow task's points are no tokens
    )
    if args.resume is None and args.overwrite and main_rank:
        clear_run(run_dir)  # only once the new run is built: a config that cannot start costs no run
    folder = trainer.load_checkpoint(resume_from) if resume_from is not None else None
    say(
        f"vermeil train: {run.family} ({type(built.model).__name__}, {n_params:,} parameters) on "
        f"{run.data.task}, {run.train.steps} steps -> {os.fspath(run_dir)}",
        file=sys.stderr,
    )
    if folder is not None:
        say(f"resumed from {os.fspath(folder)} (step {trainer.step})", file=sys.stderr)
        if trainer.step >= run.train.steps:
            say(
                f"the run already finished at step {trainer.step} (train.steps={run.train.steps}): to train "
                f"longer, vermeil train --resume {os.fspath(run_dir)} train.steps={trainer.step + run.train.steps}",
                file=sys.stderr,
            )
            return 0
    try:
        result = trainer.fit()
    except NonFiniteError as e:
        say(f"vermeil train: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_NONFINITE
    summary = ", ".join(f"{k} {v:.4g}" for k, v in result.final_eval.items())
    if result.interrupted:
        say(f"interrupted at step {result.step}; resume with: vermeil train --resume {os.fspath(run_dir)}")
        return EXIT_INTERRUPTED
    say(
        f"done: step {result.step}"
        + (f", {summary}" if summary else "")
        + f"; run folder {os.fspath(run_dir)}"
        + (f", loss curve {os.fspath(run_dir / 'loss.png')}" if (run_dir / "loss.png").is_file() else "")
    )
    if run.data.task == "text":
        say(f'next: vermeil generate {os.fspath(run_dir)} --prompt "def "', file=sys.stderr)
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    """Continue a prompt with a trained (or converted) language-model run.

    A converted run's tokenizer.json encodes the prompt (unless the weights were since trained on bytes);
    otherwise the prompt's bytes, UTF-8 or not, are the tokens.
    """
    from vermeil.data.tokenizer import ByteTokenizer, load_tokenizer
    from vermeil.generation import generate
    from vermeil.recipes import load_trained, model_vocab_size

    if args.prompt is not None and args.prompt_file is not None:
        raise CommandError("give --prompt or --prompt-file, not both")
    if args.prompt_file is not None:
        prompt_bytes = Path(args.prompt_file).read_bytes()
    elif args.prompt is not None:
        prompt_bytes = os.fsencode(args.prompt)  # undoes PEP 383's surrogates: the bytes the user typed
    else:
        raise CommandError("a prompt is required: --prompt TEXT or --prompt-file PATH")
    if not prompt_bytes:
        raise CommandError("the prompt must not be empty")
    if args.max_new_tokens < 1:
        raise CommandError(f"--max-new-tokens={args.max_new_tokens} must be >= 1")
    run, model, folder = load_trained(Path(args.run_dir))
    if run.data.task != "text":
        raise CommandError(
            f"{args.run_dir} was trained on data.task={run.data.task!r}; generate needs a text run (data.task=text)"
        )
    tokenizer = load_tokenizer(args.run_dir, folder)
    vocab = model_vocab_size(run)
    if isinstance(tokenizer, ByteTokenizer):
        prompt = tokenizer.encode_bytes(prompt_bytes)
    else:
        try:
            text = prompt_bytes.decode("utf-8")
        except UnicodeDecodeError as e:
            raise CommandError(
                f"the prompt is not UTF-8 text (byte {e.start}); {tokenizer.path} encodes text only"
            ) from None
        prompt = tokenizer.encode(text)
        if not prompt:
            raise CommandError(f"{tokenizer.path} encodes the prompt to no tokens")
        if max(prompt) >= vocab:
            raise CommandError(
                f"{tokenizer.path} gives token id {max(prompt)}, outside the model's vocabulary of {vocab}: "
                "the tokenizer does not belong to this model"
            )
    stop = tokenizer.eos_id
    if args.compile:
        msg = "compiling the decode step (torch.compile; the first tokens wait for it)"
        print(f"vermeil generate: {msg}", file=sys.stderr)
    new = generate(
        model,
        [prompt],
        args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        stop_tokens=(stop,) if stop is not None and stop < vocab else (),
        seed=args.seed,
        compile=args.compile,
    )
    print(_continuation(tokenizer, prompt, new[0], prompt_bytes))
    return 0


def _continuation(tokenizer: Any, prompt: list[int], new: Any, prompt_bytes: bytes) -> str:
    """The prompt and what the model added, decoded together: bytes complete a character the prompt began, and
    a SentencePiece-style decoder keeps the new tokens' leading space (as transformers' TextStreamer)."""
    from vermeil.data.tokenizer import ByteTokenizer

    new = [int(i) for i in new]
    if isinstance(tokenizer, ByteTokenizer):
        return tokenizer.decode([*prompt, *new])
    text = prompt_bytes.decode("utf-8")
    full, head = tokenizer.decode([*prompt, *new]), tokenizer.decode(prompt)
    return text + (full[len(head) :] if full.startswith(head) else tokenizer.decode(new))


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("vermeil")
    except PackageNotFoundError:  # pragma: no cover - run from a source tree without an install
        return "unknown"


def cmd_sample(args: argparse.Namespace) -> int:
    from vermeil.recipes import load_trained, sample_run

    if args.steps is not None and args.steps < 1:
        raise CommandError(f"--steps={args.steps} must be >= 1 (omit it for the run's data.sample_steps)")

    run, model, _ = load_trained(Path(args.run_dir))
    if run.data.task != "flow":
        raise CommandError(f"{args.run_dir} is a {run.family!r} run; sample needs a flux run (use generate)")
    out = Path(args.out) if args.out else Path(args.run_dir) / "samples.png"
    sample_run(run, model, out, steps=args.steps, guidance=args.guidance, seed=args.seed)
    print(f"wrote {os.fspath(out)}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    """Describe the model of a run config, or of a run folder (its config.yaml)."""
    from vermeil.recipes import describe_model, load_run_config, read_run_dir_config

    source = Path(args.config)
    is_run = source.is_dir()
    run = read_run_dir_config(source, args.overrides) if is_run else load_run_config(source, args.overrides)
    # The sequence length the model sees by default: the data's own (a flow job's points), else train.seq_len.
    default = getattr(run.data, "model_sequence_length", None) or run.train.seq_len
    context = args.context if args.context is not None else default
    info = describe_model(run, context, batch_size=args.batch_size)
    ctx = info["context"]
    lines = [
        f"family      {info['family']} ({info['model']})",
        f"parameters  {info['parameters']:,} (embeddings {info['embedding_parameters']:,})",
        f"FLOPs/token {_human(info['forward_flops_per_token'], 'FLOP')} forward at context {ctx}, "
        f"about {_human(info['train_flops_per_token'], 'FLOP')} to train",
    ]
    cache = info["cache_bytes"]
    if cache is not None:
        lines.append(f"cache       {_bytes(cache)} for batch {args.batch_size} x context {ctx} (float32)")
    else:
        lines.append("cache       none (this model does not decode step by step)")
    if is_run and run.data.task == "text":
        from vermeil.data.tokenizer import describe_tokenizer

        lines.append(f"tokenizer   {describe_tokenizer(source)}")
    print("\n".join(lines))
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from vermeil.recipes import describe_model, read_run_dir_config
    from vermeil.train import read_metrics

    rows = []
    for run_dir in map(Path, args.run_dirs):
        run = read_run_dir_config(run_dir)
        metrics = read_metrics(run_dir / "metrics.jsonl")
        if not metrics:
            raise CommandError(f"{os.fspath(run_dir)} has no metrics.jsonl rows: train it first")
        val = [r for r in metrics if r.get("split") == "val"]
        last = val[-1] if val else {}
        accs = [r["val_accuracy"] for r in val if isinstance(r.get("val_accuracy"), float)]
        train_rows = [r for r in metrics if r.get("split") == "train"]
        rows.append(
            {
                "run": os.fspath(run_dir),
                "family": run.family,
                "task": run.data.task,
                "params": describe_model(run)["parameters"],
                "step": (train_rows[-1]["step"] if train_rows else 0),
                "val_accuracy": last.get("val_accuracy"),
                "best_accuracy": max(accs, default=None),
                "val_loss": last.get("val_loss"),
                "headline": _headline(last),
                "time": _seconds(train_rows[-1].get("elapsed_s")) if train_rows else None,
            }
        )
    headers = list(rows[0])

    def cell(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.4f}" if abs(v) < 1000 else f"{v:.0f}"
        if isinstance(v, int):
            return f"{v:,}"
        return str(v)

    table = [headers] + [[cell(r[h]) for h in headers] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(headers))]
    for row in table:
        print("  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
    return 0


def _headline(row: dict[str, Any]) -> str | None:
    for key in ("val_bpb", "val_accuracy", "val_distance"):  # each task's headline metric
        if isinstance(row.get(key), (int, float)):
            return f"{key} {row[key]:.4f}"
    return None


def _seconds(value: Any) -> str | None:
    """Every time in one format: `12.3 s`, `4m05s`, `1h02m`."""
    if not isinstance(value, (int, float)):
        return None
    if value < 60:
        return f"{value:.1f} s"
    m, sec = divmod(round(value), 60)
    return f"{m // 60}h{m % 60:02d}m" if m >= 60 else f"{m}m{sec:02d}s"


def _check_output(out: Path, overwrite: bool) -> None:
    """Refuse to write into a folder that already holds files, unless --overwrite."""
    if out.exists() and not out.is_dir():
        raise CommandError(f"--out {os.fspath(out)} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise CommandError(f"{out} already exists and is not empty (pass --overwrite to write there)")


def cmd_convert(args: argparse.Namespace) -> int:
    """Convert between Vermeil runs and transformers / diffusers save_pretrained folders.

    `--to transformers` exports an llm, mamba or hybrid run, `--to diffusers` a flux run (default: by its
    family); `--from transformers` (Llama, Llama 4, Mamba, Mamba-2, Jamba, Bamba, Falcon-H1 causal LMs) and
    `--from diffusers` (FluxTransformer2DModel) write a run folder, with the tokenizer.json beside the weights.
    """
    if args.dest is not None and args.out is not None and args.dest != args.out:
        raise CommandError(f"two outputs given: {args.dest} and --out {args.out}")
    dest = args.out or args.dest
    if dest is None:
        raise CommandError("an output folder is required: --out DIR")
    from vermeil.data.tokenizer import copy_tokenizer_files, tokenizer_path
    from vermeil.recipes import foreign_run_config, load_foreign, load_trained
    from vermeil.recipes.convert import export_model
    from vermeil.runs import clear_run, write_run

    out, src = Path(dest), Path(args.source)
    if args.from_ is None:  # Vermeil run -> transformers or diffusers
        if not src.is_dir():
            raise CommandError(f"run folder {os.fspath(src)} does not exist")
        _check_output(out, args.overwrite)
        run, model, folder = load_trained(src)
        foreign = export_model(run.family, model, out, args.to)
        copied = copy_tokenizer_files(src, out) if tokenizer_path(src, folder) else []
        print(f"wrote {os.fspath(out)} ({type(foreign).__name__}{_with(copied)})")
        return 0
    if src.resolve() == out.resolve():
        raise CommandError("--out must differ from the source folder")
    _check_output(out, args.overwrite)
    family, foreign, model = load_foreign(args.from_, src)
    run = foreign_run_config(family, model, name=out.name or None)
    run.train.out_dir = os.fspath(out)
    if args.overwrite:
        clear_run(out)
    copied = copy_tokenizer_files(src, out)  # before the checkpoint: a run is complete once `latest` moves
    folder = write_run(run.to_dict(), model, out)
    n_params = sum(p.numel() for p in model.parameters())
    source = f"{family} run from {type(foreign).__name__}, {n_params:,} parameters"
    print(f"wrote {os.fspath(out)} ({source}{_with(copied)})")
    hint = "generate {} --prompt TEXT" if run.data.task == "text" else "sample {}"
    print(f"checkpoint {os.fspath(folder)}; next: vermeil {hint.format(os.fspath(out))}", file=sys.stderr)
    return 0


def _with(copied: Sequence[str]) -> str:
    return f", with {' and '.join(copied)}" if copied else ""


_TRAIN_EXAMPLES = """examples:
  vermeil train configs/hybrid-lm.yaml                      # -> runs/hybrid-lm (the config's name)
  vermeil train configs/llm-tiny.yaml train.steps=200 train.lr=1e-3 --out runs/try
  vermeil train --resume runs/hybrid-lm                     # continue after an interruption, exactly
  vermeil train --resume runs/hybrid-lm train.steps=4000    # train a finished run longer
  vermeil train configs/flux-seq2seq.yaml train.device=cuda train.precision=bf16
  torchrun --nproc_per_node=2 -m vermeil train configs/llm-tiny.yaml distributed.strategy=fsdp2

Every key of the config can be overridden as section.key=value (see README.md, "Run configs").
"""


def _add_debug(p: argparse.ArgumentParser, default: Any = argparse.SUPPRESS) -> None:
    # SUPPRESS on the subcommands: `vermeil --debug train ...` must not be reset by the subparser's default.
    p.add_argument("--debug", action="store_true", default=default, help="show the full traceback on errors")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the `vermeil` command (one subparser per subcommand)."""
    parser = argparse.ArgumentParser(
        prog="vermeil", description="Train, sample and inspect Vermeil models from YAML run configs."
    )
    _add_debug(parser, default=False)
    parser.add_argument("--version", action="version", version=f"vermeil {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser(
        "train",
        help="train a model from a run config",
        description=inspect.cleandoc(cmd_train.__doc__ or ""),
        epilog=_TRAIN_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("config", nargs="?", metavar="CONFIG", help="run config YAML (optional with --resume)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. train.lr=1e-3")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue RUN_DIR's run from its newest checkpoint")
    p.add_argument("--out", metavar="DIR", help="run folder (default: train.out_dir or runs/<config name>)")
    p.add_argument("--overwrite", action="store_true", help="start over in a folder that already holds a run")
    p.add_argument(
        "--default-malloc",
        action="store_true",
        help="leave glibc's malloc as it is (by default freed memory is kept for the next step: faster, but "
        "the process's memory stays at its peak)",
    )
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "generate", help="generate text from a trained language-model run", description=cmd_generate.__doc__
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run folder written by `vermeil train`")
    p.add_argument("--prompt", help="text to continue")
    p.add_argument("--prompt-file", metavar="PATH", help="continue this file's bytes as they are")
    p.add_argument(
        "--max-new-tokens", type=int, default=200, help="tokens (or bytes) to generate (default 200)"
    )
    p.add_argument(
        "--temperature", type=float, default=0.8, help="sampling temperature; 0 is greedy (default 0.8)"
    )
    p.add_argument("--top-k", type=int, help="sample among the K most likely tokens only")
    p.add_argument("--top-p", type=float, help="nucleus sampling: keep the top tokens up to mass P")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--compile", action="store_true", help="compile the decode step (for long outputs)")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("sample", help="sample a trained flow (flux) run into a PNG")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a flux run folder written by `vermeil train`")
    p.add_argument("--steps", type=int, help="Euler steps (default: data.sample_steps of the run)")
    p.add_argument("--guidance", type=float, help="guidance scale (default: none)")
    p.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    p.add_argument("--out", metavar="PNG", help="output image (default RUN_DIR/samples.png)")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("info", help="parameters, FLOPs per token and cache memory of a run config's model")
    p.add_argument("config", metavar="CONFIG", help="run config YAML")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. model.dim=64")
    p.add_argument("--context", type=int, help="context length (default train.seq_len)")
    p.add_argument("--batch-size", type=int, default=1, help="batch size of the cache estimate (default 1)")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("compare", help="print the final accuracies and losses of several runs side by side")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run folders written by `vermeil train`")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser(
        "convert",
        help="convert a run to a transformers folder, or a transformers/diffusers folder to a run",
        description=cmd_convert.__doc__,
    )
    p.add_argument("source", metavar="SOURCE", help="a run (--to) or a save_pretrained folder (--from)")
    p.add_argument("dest", nargs="?", metavar="OUT_DIR", help="output folder (or --out)")
    p.add_argument("--out", metavar="DIR", help="output folder")
    libraries = ["transformers", "diffusers"]
    direction = p.add_mutually_exclusive_group()
    direction.add_argument(
        "--to",
        choices=libraries,
        help="export a run: llm/mamba/hybrid to transformers, flux to diffusers (default: by the run's family)",
    )
    direction.add_argument(
        "--from", dest="from_", choices=libraries, help="import a save_pretrained folder into a run folder"
    )
    p.add_argument("--overwrite", action="store_true", help="write into an output folder that holds files")
    p.set_defaults(func=cmd_convert)
    for p in sub.choices.values():  # last, so that --help lists it last
        _add_debug(p)
    return parser


def _checkpoint_failure(e: BaseException) -> str | None:
    """The first rank's error of torch's `CheckpointException` (whose own text is every rank's traceback)."""
    failures = getattr(e, "failures", None)
    if type(e).__name__ != "CheckpointException" or not isinstance(failures, dict):
        return None
    for rank, failure in sorted(failures.items(), key=lambda kv: str(kv[0])):
        err = failure[0] if isinstance(failure, tuple) else failure
        if isinstance(err, BaseException):
            return f"distributed checkpoint failed on rank {rank}: {type(err).__name__}: {err}"
    return "distributed checkpoint failed"


def _one_line(e: BaseException) -> str:
    text = _checkpoint_failure(e) or str(e) or type(e).__name__
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        where = f" writing {e.filename}" if e.filename and os.fspath(e.filename) not in text else ""
        text = f"{text}{where} (free some disk space; the checkpoints written before are intact)"
        if e.errno == errno.ENOSPC and "disk is full" not in text:
            text = f"the disk is full: {text}"
    elif isinstance(e, FileNotFoundError) and e.filename and not e.args[1:]:
        text = str(e)
    elif isinstance(e, OSError) and e.strerror and e.filename:
        text = f"{e.strerror}: {e.filename}"
    text = " ".join(text.split())  # one line, whatever the message held
    if "Weights only" in text:  # torch's refusal of a pickle advises unpickling: never shown (SECURITY.md)
        from vermeil.checkpoint import refusal_text  # imports torch: only here

        text = refusal_text(text)
    return text


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `vermeil` command with `argv` (default `sys.argv[1:]`); returns the exit status.

    A reader that leaves early (`vermeil info RUN | head -1`) ends the command quietly with status 141."""
    try:
        try:
            return _main(argv)
        finally:  # SystemExit (--help) too: flushed here, a closed pipe is met below, not at interpreter exit
            sys.stdout.flush()
    except BrokenPipeError:
        # Python's advice (the signal module's note on SIGPIPE): point stdout at devnull, so that the flush at
        # exit stays quiet too, and leave without a word.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return EXIT_BROKEN_PIPE


def _main(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    # Overrides may follow options (`train CONFIG --out DIR key=value`), which plain parse_args refuses.
    args, extra = parser.parse_known_args(argv)
    stray = [a for a in extra if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    with warnings.catch_warnings():
        if not args.debug:  # a warning is one line too
            warnings.showwarning = lambda message, *_, **__: print(
                f"vermeil {args.command}: warning: {' '.join(str(message).split())}", file=sys.stderr
            )
        return _call(args)


def _call(args: argparse.Namespace) -> int:
    try:
        return args.func(args)
    except (SystemExit, GeneratorExit, BrokenPipeError):  # a closed stdout: main leaves quietly
        raise
    except BaseException as e:  # torch's CheckpointException derives from BaseException
        if args.debug:
            raise
        if isinstance(e, KeyboardInterrupt):
            print(f"vermeil {args.command}: interrupted", file=sys.stderr)
            return EXIT_INTERRUPTED
        from vermeil.runs import RunLockedError

        # ConfigError is a ValueError, FileNotFoundError an OSError.
        known = (CommandError, ValueError, TypeError, ImportError, OSError, RunLockedError)
        # A CheckpointException is a dcp/ folder that cannot be read or written: the user's data, not a bug.
        is_known = isinstance(e, known) or _checkpoint_failure(e) is not None
        prefix = "error" if is_known else f"internal error ({type(e).__name__})"
        hint = "" if is_known else " (rerun with --debug for the traceback)"
        print(f"vermeil {args.command}: {prefix}: {_one_line(e)}{hint}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
