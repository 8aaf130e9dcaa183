"""``muse-torchrec``: synth | prepare | train | eval | export | plan | demo.

Every subcommand exits non-zero with a one-line message on a bad config, bad data or bad arguments.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Mapping, NoReturn, Optional, Sequence, Tuple

from muse_torchrec.config import ConfigError, ExperimentConfig, SynthConfig, load_config
from muse_torchrec.process import end_process

if TYPE_CHECKING:  # the training stack (torch, torchrec) is imported only by the commands that use it
    from muse_torchrec.train.checkpoint import CheckpointInfo

log = logging.getLogger("muse_torchrec")

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO_ROOT / "configs" / "demo_cpu.yaml"


def _setup_logging() -> None:
    rank = os.environ.get("RANK", "0")
    logging.basicConfig(
        level=logging.INFO,
        format=f"%(asctime)s [rank {rank}] %(message)s",
        datefmt="%H:%M:%S",
    )
    # The planner warns about topology construction and dry-run estimates on every plan.
    logging.getLogger("torchrec.distributed").setLevel(logging.ERROR)


def _scaled(cfg: SynthConfig, scale: float, seed: Optional[int]) -> SynthConfig:
    return dataclasses.replace(
        cfg,
        train_users=max(1, int(cfg.train_users * scale)),
        test_users=max(1, int(cfg.test_users * scale)),
        num_items=max(100, int(cfg.num_items * scale)),
        seed=cfg.seed if seed is None else seed,
    )


def ensure_prepared(cfg: ExperimentConfig) -> None:
    """Synthesize (if allowed and missing) and prepare the data a config points to."""
    from muse_torchrec.data.prepare import prepare
    from muse_torchrec.data.synthetic import synthesize

    prepared = Path(cfg.data.prepared_dir)
    if (prepared / "meta.json").exists():
        return
    raw = Path(cfg.data.raw_dir)
    if not raw.exists():
        if not cfg.data.synthesize:
            raise FileNotFoundError(f"data.raw_dir {raw} does not exist (and data.synthesize is false)")
        log.info("synthesizing Taobao-MM-shaped data into %s", raw)
        synthesize(raw, cfg.data.synth)
    log.info("preparing %s -> %s (vocab %s)", raw, prepared, cfg.data.vocab)
    prepare(raw, prepared, vocab=cfg.data.vocab, max_history=cfg.data.max_history)


def cmd_synth(args: argparse.Namespace) -> int:
    from muse_torchrec.data.synthetic import synthesize

    cfg = _scaled(load_config(args.config).data.synth, args.scale, args.seed)
    stats = synthesize(Path(args.out), cfg, overwrite=args.overwrite)
    print(json.dumps(stats, indent=2))
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from muse_torchrec.data.prepare import prepare

    meta = prepare(Path(args.raw), Path(args.out), vocab=args.vocab, max_history=args.max_history)
    print(json.dumps({"vocab_sizes": meta["vocab_sizes"], "splits": {s: {k: v for k, v in info.items() if k != "shards"} for s, info in meta["splits"].items()}}, indent=2))
    return 0


def _config(args: argparse.Namespace) -> ExperimentConfig:
    return load_config(args.config, args.set or ())


def cmd_train(args: argparse.Namespace) -> int:
    import torch.distributed as dist

    from muse_torchrec.train.distributed import distributed
    from muse_torchrec.train.trainer import run

    cfg = _config(args)
    with distributed(args.device) as ctx:
        if ctx.is_main:
            ensure_prepared(cfg)
        dist.barrier()
        metrics = run(cfg, ctx)
        if ctx.is_main:
            print(format_metrics(metrics))
    return 0


def _checkpoint_config(args: argparse.Namespace) -> Tuple[CheckpointInfo, ExperimentConfig]:
    """(checkpoint info, config): ``--config`` or else the checkpoint's own, with ``--set`` overrides."""
    from muse_torchrec.train.checkpoint import CONFIG_FILE, read_info, resolve_checkpoint

    info = read_info(resolve_checkpoint(args.checkpoint))
    return info, load_config(args.config or info.path / CONFIG_FILE, args.set or ())


def cmd_eval(args: argparse.Namespace) -> int:
    """Evaluate a checkpoint on the test split, on any number of ranks; writes only ``--out``."""
    from muse_torchrec.train.distributed import distributed
    from muse_torchrec.train.trainer import evaluate_checkpoint

    info, cfg = _checkpoint_config(args)
    with distributed(args.device) as ctx:
        metrics = evaluate_checkpoint(info, cfg, ctx)
        if ctx.is_main:
            print(f"checkpoint {info.path} (step {info.step})\n{format_metrics(metrics)}")
            if args.out:
                Path(args.out).write_text(json.dumps(metrics, indent=2))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Write a checkpoint's weights for serving (format: muse_torchrec/train/export.py)."""
    from muse_torchrec.train.checkpoint import check_model_config
    from muse_torchrec.train.export import export_checkpoint

    info, cfg = _checkpoint_config(args)
    check_model_config(info, cfg)
    out = export_checkpoint(info, cfg, Path(args.out))
    print(f"exported {info.path} (step {info.step}) to {out}")
    return 0


def format_metrics(metrics: Mapping[str, object]) -> str:
    """The results table printed at the end of a run."""
    rows = [
        ("AUC", "auc"), ("GAUC (exact)", "gauc"), ("GAUC (per batch, reference)", "gauc_per_batch"),
        ("log loss", "logloss"), ("best achievable AUC", "best_auc"), ("best achievable GAUC", "best_gauc"),
        ("eval samples", "num_eval_samples"), ("train samples/s", "train_samples_per_s"),
        ("  after the first log line", "train_samples_per_s_warm"),
    ]
    counts = ("num_eval_samples", "train_samples_per_s", "train_samples_per_s_warm")
    lines = [f"{'metric':<30} {'value':>12}", "-" * 43]
    for label, key in rows:
        value = metrics.get(key)
        if value is None:
            continue
        text = f"{value:>12,.0f}" if key in counts else f"{value:>12.4f}"
        lines.append(f"{label:<30} {text}")
    gauc, best = metrics.get("gauc"), metrics.get("best_gauc")
    if isinstance(gauc, float) and isinstance(best, float) and best > 0.5:
        lines.append(f"{'share of GAUC gap closed':<30} {(gauc - 0.5) / (best - 0.5):>12.1%}")
    return "\n".join(lines)


def _plan_vocab_sizes(cfg: ExperimentConfig) -> Dict[str, int]:
    meta_path = Path(cfg.data.prepared_dir) / "meta.json"
    if meta_path.exists():
        return dict(json.loads(meta_path.read_text())["vocab_sizes"])
    if cfg.sharding.plan_vocab_sizes:
        return dict(cfg.sharding.plan_vocab_sizes)
    raise ConfigError(
        f"no vocabulary sizes to plan with: {meta_path} does not exist and sharding.plan_vocab_sizes is empty"
    )


def cmd_plan(args: argparse.Namespace) -> int:
    from muse_torchrec import features as F
    from muse_torchrec.data.batch import sequence_features
    from muse_torchrec.model.methods import build_model, get_method
    from muse_torchrec.sharding import make_sharders, plan_model
    from muse_torchrec.train.sharded import attach_sparse_optimizer

    cfg = _config(args)
    if args.hbm_gb is not None or args.ddr_gb is not None:
        cfg = dataclasses.replace(
            cfg, sharding=dataclasses.replace(cfg.sharding, hbm_gb=args.hbm_gb, ddr_gb=args.ddr_gb)
        )
    if args.world_size % args.nodes:
        raise ConfigError(f"--world-size {args.world_size} is not a multiple of --nodes {args.nodes}")
    vocab = _plan_vocab_sizes(cfg)
    missing = [t.name for t in F.TABLES if t.name not in vocab]
    if missing:
        raise ConfigError(f"vocabulary sizes missing for tables: {', '.join(missing)}")
    features = sequence_features(get_method(cfg.model.method).gsu)
    model = build_model(cfg.model, vocab, features, cfg.data.recent, cfg.data.max_history)
    attach_sparse_optimizer(model, cfg.train.sparse_optimizer, cfg.train.sparse_lr, args.device)
    report = plan_model(
        model, cfg.sharding, world_size=args.world_size, compute_device=args.device,
        batch_size=cfg.train.batch_size, local_world_size=args.world_size // args.nodes,
        sharders=make_sharders(),
    )
    print(f"plan for {args.world_size} {args.device} ranks on {args.nodes} node(s), "
          f"sparse optimizer {cfg.train.sparse_optimizer}, batch {cfg.train.batch_size}/rank")
    print(report.format())
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"per_rank_bytes": report.per_rank_bytes(), "shards": [dataclasses.asdict(s) for s in report.shards]},
            indent=2,
        ))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Synthetic data -> prepare -> torchx 2-rank CPU training -> evaluation -> results table."""
    out = Path(args.out).resolve()
    cfg = load_config(DEFAULT_CONFIG, [f"data.raw_dir={out}/raw", f"data.prepared_dir={out}/prepared",
                                       f"train.run_dir={out}/run"])
    ensure_prepared(cfg)
    overrides = ";".join([f"data.raw_dir={out}/raw", f"data.prepared_dir={out}/prepared", f"train.run_dir={out}/run"])
    command: List[str] = [
        sys.executable, "-m", "torchx.cli.main", "run", "-s", "local_cwd",
        str(REPO_ROOT / "launch" / "muse.py") + ":train",
        "--nnodes", "1", "--nproc_per_node", str(args.nproc), "--config", str(DEFAULT_CONFIG),
        "--overrides", overrides,
    ]
    log.info("launching: %s", " ".join(command))
    # torchx's local scheduler starts `torchrun` from PATH: use the one next to this interpreter.
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PATH": path}
    subprocess.run(command, check=True, cwd=REPO_ROOT, env=env)
    metrics = json.loads((out / "run" / "metrics.json").read_text())
    print("\nMUSE on synthetic Taobao-MM, 2 CPU ranks (torchx local_cwd)\n")
    print(format_metrics(metrics))
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    """Train and evaluate each method over seeds on the same prepared data; write the study's report."""
    from muse_torchrec.compare import CompareOptions, run_compare

    ensure_prepared(_config(args))
    study = "table3" if args.table3 else "table2" if args.table2 else "paper"
    opts = CompareOptions(
        config=Path(args.config).resolve(), overrides=tuple(args.set or ()), study=study,
        methods=tuple(args.methods) if args.methods else None, seeds=args.seeds, out=Path(args.out).resolve(),
        nproc=args.nproc, device=args.device, jobs=args.jobs, force=args.force,
    )
    run_compare(opts, command=" ".join(["muse-torchrec", *sys.argv[1:]]))
    print((opts.out / ("compare.md" if study == "paper" else f"compare_{study}.md")).read_text())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="muse-torchrec", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("synth", help="write a synthetic Taobao-MM-shaped raw dataset")
    p.add_argument("--out", required=True)
    p.add_argument("--config", default=None, help="take data.synth from this config (default: built-in)")
    p.add_argument("--scale", type=float, default=1.0, help="multiply users and items by this")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("prepare", help="raw Parquet -> vocabularies + prepared shards")
    p.add_argument("--raw", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--vocab", default="full", help="full | p90 | min-count:N")
    p.add_argument("--max-history", type=int, default=1000)
    p.set_defaults(func=cmd_prepare)

    for name, func, text in (("train", cmd_train, "train then evaluate"),):
        p = sub.add_parser(name, help=text)
        p.add_argument("--config", default=str(DEFAULT_CONFIG))
        p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config value")
        p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
        p.set_defaults(func=func)

    p = sub.add_parser("eval", help="evaluate a checkpoint on the test split (any number of ranks)")
    p.add_argument("--checkpoint", required=True, help="a checkpoint dir, or a run dir (its latest checkpoint)")
    p.add_argument("--config", default=None, help="default: the checkpoint's config.yaml")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config value")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--out", default=None, help="also write the metrics as JSON here")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("export", help="write a checkpoint's weights for serving (dense.pt + one .npy per table)")
    p.add_argument("--checkpoint", required=True, help="a checkpoint dir, or a run dir (its latest checkpoint)")
    p.add_argument("--out", required=True, help="the export directory (must not exist)")
    p.add_argument("--config", default=None, help="default: the checkpoint's config.yaml")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config value, e.g. data.prepared_dir")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("plan", help="print the sharding plan and per-rank memory (no GPU needed)")
    p.add_argument("--config", default=str(DEFAULT_CONFIG))
    p.add_argument("--set", action="append", metavar="KEY=VALUE")
    p.add_argument("--world-size", type=int, required=True)
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--hbm-gb", type=float, default=None, help="device memory per rank (GiB)")
    p.add_argument("--ddr-gb", type=float, default=None, help="host memory per rank (GiB)")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="device type of the target cluster")
    p.add_argument("--json", default=None, help="also write the plan as JSON here")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("compare", help="train and evaluate several methods over seeds; write compare.md/.json/.png")
    p.add_argument("--config", default=str(DEFAULT_CONFIG))
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config value in every run")
    p.add_argument("--methods", nargs="+", default=None, help="methods to run (default: the study's)")
    p.add_argument("--seeds", type=int, default=3, help="number of seeds, from train.seed on")
    study = p.add_mutually_exclusive_group()
    study.add_argument("--table3", action="store_true", help="the ESU ablations (paper Table 3)")
    study.add_argument("--table2", action="store_true", help="the GSU variants (paper Table 2)")
    p.add_argument("--out", default="out/compare", help="reports here, runs under <out>/runs (reused when unchanged)")
    p.add_argument("--nproc", type=int, default=1, help="ranks per run (torchrun when > 1)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--jobs", type=int, default=1, help="runs at a time (more skews the measured samples/s)")
    p.add_argument("--force", action="store_true", help="rerun runs that are already done")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("demo", help="the embedded default end to end on CPU")
    p.add_argument("--out", default="out/demo")
    p.add_argument("--nproc", type=int, default=2)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    _setup_logging()
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ConfigError, FileNotFoundError, FileExistsError, ValueError) as err:
        print(f"muse-torchrec {args.command}: error: {err}", file=sys.stderr)
        return 2


def entry() -> NoReturn:
    """The ``muse-torchrec`` process: ``main``, then ``end_process`` (its docstring says why)."""
    end_process(main())


if __name__ == "__main__":
    entry()
