"""``muse-torchrec compare``: train and evaluate several methods over seeds, then report.

Every (method, seed) run is a ``muse-torchrec train`` subprocess on the same prepared data and
budget (the config), with ``model.method``, ``train.seed`` and ``data.seed`` set (the seed changes
the model's initialisation and the data order, never the data). Runs go to
``<out>/runs/<method>/seed<seed>`` and are reused when their saved config equals the one asked for,
so studies share runs (``muse`` is in all three) and an interrupted study resumes.

Studies: ``paper`` (the paper's comparison, Open-Source-1k), ``table3`` (ESU ablations), ``table2``
(GSU variants). Each writes ``compare[_<study>].md``, ``.json`` and ``.png`` into ``<out>``.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from muse_torchrec import features as F
from muse_torchrec.config import ExperimentConfig, config_fingerprint, load_config
from muse_torchrec.data.batch import WHOLE_HISTORY_KINDS
from muse_torchrec.data.loader import PreparedData, make_loader
from muse_torchrec.model.methods import get_method
from muse_torchrec.train.trainer import make_builder

log = logging.getLogger("muse_torchrec")

METRICS = ("gauc", "auc", "gauc_per_batch", "logloss", "train_samples_per_s")
# Batches read to measure the item/category lookups per sample of each method.
LOOKUP_SAMPLE_BATCHES = 4


@dataclass(frozen=True)
class PaperTable:
    """GAUC reported in the paper for (some of) a study's methods."""

    title: str
    gauc: Mapping[str, float]


@dataclass(frozen=True)
class Study:
    """Methods compared together, the baseline of the relative changes and the claims to check.

    ``claims``: (better, worse) pairs the paper reports; each holds when the mean GAUC gap exceeds
    the larger of the two seed standard deviations.
    """

    name: str
    title: str
    methods: Tuple[str, ...]
    baseline: str
    claims: Tuple[Tuple[str, str], ...]
    paper: Optional[PaperTable]
    paper_note: str = ""

    @property
    def stem(self) -> str:
        return "compare" if self.name == "paper" else f"compare_{self.name}"


_ESU_ABLATIONS = ("esu_ta", "esu_simtier", "esu_ta_simtier", "esu_sata", "muse")
STUDIES: Dict[str, Study] = {
    "paper": Study(
        name="paper",
        title="DIN, SIM-hard, SIM-soft, TWIN, MISS and MUSE",
        methods=("din", "sim_hard", "sim_soft", "twin", "miss", "muse"),
        baseline="din",
        claims=(("muse", "sim_soft"), ("muse", "sim_hard"), ("sim_soft", "din"), ("sim_hard", "din")),
        paper=PaperTable(
            "paper, Open-Source-1k (Taobao-MM)",
            {"din": 0.6082, "sim_hard": 0.6139, "sim_soft": 0.6135, "twin": 0.6098, "miss": 0.6097, "muse": 0.6154},
        ),
    ),
    "table3": Study(
        name="table3",
        title="ESU ablations (paper Table 3), MUSE's GSU",
        methods=_ESU_ABLATIONS,
        baseline="esu_ta",
        claims=tuple(("muse", other) for other in _ESU_ABLATIONS if other != "muse"),
        paper=PaperTable(
            "paper Table 3 (industrial data)",
            {"esu_ta": 0.6301, "esu_simtier": 0.6345, "esu_ta_simtier": 0.6361, "esu_sata": 0.6339, "muse": 0.6377},
        ),
    ),
    "table2": Study(
        name="table2",
        title="GSU variants (paper Table 2), MUSE's ESU",
        methods=("muse", "gsu_projection", "gsu_scl_id_cosine", "gsu_scl_id_attention"),
        baseline="muse",
        claims=(),
        paper=None,
        paper_note="The paper reports GAUC changes of -0.13 % .. +0.03 % against the plain SCL cosine.",
    ),
}


@dataclass(frozen=True)
class RunSpec:
    method: str
    seed: int
    run_dir: Path
    overrides: Tuple[str, ...]


@dataclass
class MethodResult:
    """One method's runs: metrics per seed and their summary."""

    method: str
    per_seed: Dict[int, Dict[str, float]]
    lookups_per_sample: float
    mean: Dict[str, float] = field(init=False)
    std: Dict[str, float] = field(init=False)

    def __post_init__(self) -> None:
        values = {key: np.array([m[key] for m in self.per_seed.values()], dtype=np.float64) for key in METRICS}
        self.mean = {key: float(v.mean()) for key, v in values.items()}
        # Sample standard deviation over seeds (0 with one seed).
        self.std = {key: float(v.std(ddof=1)) if v.size > 1 else 0.0 for key, v in values.items()}


def relative_change_pct(value: float, baseline: float) -> float:
    """The paper's relative GAUC change: ``100 * (value / baseline - 1)`` percent."""
    return 100.0 * (value / baseline - 1.0)


def run_specs(config: Path, overrides: Sequence[str], methods: Sequence[str], seeds: Sequence[int],
              out: Path) -> List[RunSpec]:
    """One run per (method, seed), in ``<out>/runs/<method>/seed<seed>``, with its ``--set`` overrides."""
    specs = []
    for method in methods:
        for seed in seeds:
            run_dir = out / "runs" / method / f"seed{seed}"
            specs.append(RunSpec(method, seed, run_dir, tuple(overrides) + (
                f"model.method={method}", f"train.seed={seed}", f"data.seed={seed}", f"train.run_dir={run_dir}",
            )))
    return specs


def _is_done(spec: RunSpec, config: Path) -> bool:
    """A finished run of exactly this config (the trainer saves the resolved config)."""
    saved, metrics = spec.run_dir / "config.yaml", spec.run_dir / "metrics.json"
    if not (saved.is_file() and metrics.is_file()):
        return False
    return config_fingerprint(load_config(saved)) == config_fingerprint(load_config(config, spec.overrides))


def train_command(config: Path, spec: RunSpec, nproc: int, device: str) -> List[str]:
    """``muse-torchrec train`` in one process, or under torchrun with ``nproc`` ranks."""
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    command = launcher + ["-m", "muse_torchrec.cli", "train", "--config", str(config), "--device", device]
    for item in spec.overrides:
        command += ["--set", item]
    return command


def _run(config: Path, spec: RunSpec, nproc: int, device: str) -> None:
    """Run one training; its output goes to ``<run_dir>/train.log``."""
    # A fresh directory: nothing of an older run (metrics, checkpoints) can be mistaken for this one's.
    shutil.rmtree(spec.run_dir, ignore_errors=True)
    tmp = spec.run_dir / "tmp"
    tmp.mkdir(parents=True)
    # One OpenMP thread per process and a private TMPDIR (DESIGN.md: CPU runs are 3-20x slower otherwise).
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp)}
    start = time.perf_counter()
    with (spec.run_dir / "train.log").open("w") as logfile:
        done = subprocess.run(train_command(config, spec, nproc, device), stdout=logfile, stderr=subprocess.STDOUT, env=env)
    shutil.rmtree(tmp, ignore_errors=True)
    if done.returncode != 0:
        raise RuntimeError(f"{spec.method} seed {spec.seed} failed (exit {done.returncode}); see {spec.run_dir / 'train.log'}")
    log.info("%s seed %d done in %.0f s", spec.method, spec.seed, time.perf_counter() - start)


def run_all(config: Path, specs: Sequence[RunSpec], nproc: int, device: str, jobs: int, force: bool) -> None:
    """Run every spec not already done, ``jobs`` at a time."""
    todo = [s for s in specs if force or not _is_done(s, config)]
    log.info("%d runs to do, %d reused, %d at a time", len(todo), len(specs) - len(todo), jobs)
    # Slowest first (whole-history methods), so that the parallel slots end together.
    todo.sort(key=lambda s: get_method(s.method).gsu in WHOLE_HISTORY_KINDS, reverse=True)
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        futures = [pool.submit(_run, config, spec, nproc, device) for spec in todo]
    # Every run was tried (the pool waited for all); report every failure at once.
    failures = [str(f.exception()) for f in futures if f.exception() is not None]
    if failures:
        raise RuntimeError("; ".join(failures))


def lookups_per_sample(cfg: ExperimentConfig, method: str) -> float:
    """Mean item + category table lookups per sample of ``method``'s batches (first train batches)."""
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, method=method))
    data = PreparedData(cfg.data.prepared_dir)
    loader = make_loader(data, "train", cfg.train.batch_size, make_builder(cfg, data), rank=0, world_size=1,
                         num_workers=0, seed=cfg.data.seed, shuffle=False, drop_last=False)
    batches = list(itertools.islice(iter(loader), LOOKUP_SAMPLE_BATCHES))
    item_and_cate = sum(count for b in batches
                        for name, count in zip(b.sparse_features.keys(), b.sparse_features.length_per_key())
                        if name not in F.SIDE_FEATURES)
    return item_and_cate / max(sum(b.batch_size for b in batches), 1)


def collect(specs: Sequence[RunSpec], lookups: Mapping[str, float]) -> Dict[str, MethodResult]:
    """Each method's metrics.json per seed (methods in ``lookups``' order)."""
    return {
        method: MethodResult(
            method, {s.seed: json.loads((s.run_dir / "metrics.json").read_text()) for s in specs if s.method == method},
            per_sample,
        )
        for method, per_sample in lookups.items()
    }


def claim_checks(study: Study, results: Mapping[str, MethodResult]) -> List[Dict[str, object]]:
    """Each (better, worse) claim of the study whose methods were run: gap, noise, verdict."""
    checks = []
    for better, worse in study.claims:
        if better not in results or worse not in results:
            continue
        gap = results[better].mean["gauc"] - results[worse].mean["gauc"]
        noise = max(results[better].std["gauc"], results[worse].std["gauc"])
        checks.append({"better": better, "worse": worse, "gap": gap, "seed_std": noise, "holds": gap > noise})
    return checks


def report_json(study: Study, results: Mapping[str, MethodResult], seeds: Sequence[int], command: str,
                seconds: float) -> Dict[str, object]:
    baseline = results.get(study.baseline)
    methods = {}
    for name, res in results.items():
        method = get_method(name)
        entry: Dict[str, object] = {
            "label": method.label, "description": method.description, "gsu_kind": method.gsu,
            "lookups_per_sample": res.lookups_per_sample, "mean": res.mean, "std": res.std,
            "per_seed": {str(seed): {k: m[k] for k in METRICS} for seed, m in res.per_seed.items()},
            "gauc_change_vs_baseline_pct": (
                relative_change_pct(res.mean["gauc"], baseline.mean["gauc"]) if baseline else None
            ),
        }
        if study.paper is not None and name in study.paper.gauc:
            paper = study.paper.gauc
            entry["paper_gauc"] = paper[name]
            entry["paper_gauc_change_vs_baseline_pct"] = (
                relative_change_pct(paper[name], paper[study.baseline]) if study.baseline in paper else None
            )
        methods[name] = entry
    best = [m.get("best_gauc") for res in results.values() for m in res.per_seed.values()]
    return {
        "study": study.name, "title": study.title, "command": command, "seeds": list(seeds),
        "baseline": study.baseline, "wall_seconds": seconds,
        "best_by_mean": max(results, key=lambda name: results[name].mean["gauc"]),
        "best_achievable_gauc": next((b for b in best if b is not None), None),
        "methods": methods, "claims": claim_checks(study, results),
    }


def _fmt(mean: float, std: float, digits: int = 4) -> str:
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def report_markdown(report: Mapping[str, object]) -> str:
    study = STUDIES[str(report["study"])]
    methods: Mapping[str, Mapping] = report["methods"]  # type: ignore[assignment]
    base_label = get_method(study.baseline).label
    has_paper = study.paper is not None
    lines = [
        f"# {report['title']}",
        "",
        f"Command: `{report['command']}`  ",
        f"Seeds: {report['seeds']} (mean ± sample standard deviation over seeds); wall time "
        f"{float(report['wall_seconds']) / 60:.1f} min.",
        "",
        "| method | GAUC | Δ GAUC vs " + base_label + " | AUC | per-batch GAUC | log loss | train samples/s "
        "| item+cate lookups/sample |" + (" paper GAUC | paper Δ |" if has_paper else ""),
        "|---|---|---|---|---|---|---|---|" + ("---|---|" if has_paper else ""),
    ]
    for name, m in methods.items():
        mean, std = m["mean"], m["std"]
        change = m["gauc_change_vs_baseline_pct"]
        row = (
            f"| {m['label']} | {_fmt(mean['gauc'], std['gauc'])} | "
            + ("" if change is None else f"{change:+.2f} %") + " | "
            f"{_fmt(mean['auc'], std['auc'])} | {_fmt(mean['gauc_per_batch'], std['gauc_per_batch'])} | "
            f"{_fmt(mean['logloss'], std['logloss'])} | {mean['train_samples_per_s']:,.0f} | "
            f"{m['lookups_per_sample']:,.0f} |"
        )
        if has_paper:
            paper, paper_change = m.get("paper_gauc"), m.get("paper_gauc_change_vs_baseline_pct")
            row += (f" {paper:.4f} |" if paper is not None else " |") + (
                f" {paper_change:+.2f} % |" if paper_change is not None else " |")
        lines.append(row)
    lines += ["", f"Highest mean GAUC: **{get_method(str(report['best_by_mean'])).label}**.",
              "Δ GAUC is the relative change of the mean GAUC, 100 * (GAUC / GAUC_" + base_label + " - 1), "
              "as the paper reports it."]
    if report.get("best_achievable_gauc") is not None:
        lines.append(f"Best achievable GAUC on this data (the true click probabilities): "
                     f"{float(report['best_achievable_gauc']):.4f}.")
    if study.paper_note:
        lines.append(study.paper_note)
    claims = report["claims"]
    if claims:
        lines += ["", "## The paper's ordering", "",
                  "| claim | GAUC gap | larger seed std | holds (gap > std) |", "|---|---|---|---|"]
        for c in claims:  # type: ignore[union-attr]
            lines.append(f"| {get_method(c['better']).label} > {get_method(c['worse']).label} | "
                         f"{c['gap']:+.4f} | {c['seed_std']:.4f} | {'yes' if c['holds'] else 'NO'} |")
    lines += ["", "## Per seed (GAUC)", "", "| method | " + " | ".join(f"seed {s}" for s in report["seeds"]) + " |",
              "|---|" + "---|" * len(report["seeds"])]
    for m in methods.values():
        lines.append(f"| {m['label']} | " + " | ".join(f"{m['per_seed'][str(s)]['gauc']:.4f}" for s in report["seeds"])
                     + " |")
    return "\n".join(lines) + "\n"


def plot(report: Mapping[str, object], path: Path) -> None:
    """Bar chart of GAUC (mean, error bars = seed std), next to the paper's numbers when it has some."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    study = STUDIES[str(report["study"])]
    methods: Mapping[str, Mapping] = report["methods"]  # type: ignore[assignment]
    panels = 2 if study.paper is not None else 1
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4), squeeze=False)
    labels = [m["label"] for m in methods.values()]
    means = np.array([m["mean"]["gauc"] for m in methods.values()])
    stds = np.array([m["std"]["gauc"] for m in methods.values()])
    _bars(axes[0][0], labels, means, stds, f"this run: mean ± std over {len(report['seeds'])} seeds")
    if study.paper is not None:
        shown = [(get_method(n).label, study.paper.gauc[n]) for n in methods if n in study.paper.gauc]
        _bars(axes[0][1], [s[0] for s in shown], np.array([s[1] for s in shown]), None, study.paper.title)
    fig.suptitle(f"GAUC: {study.title}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _bars(ax, labels: Sequence[str], values: np.ndarray, errors: Optional[np.ndarray], title: str) -> None:
    ax.bar(range(len(values)), values, yerr=errors, capsize=4, color="tab:blue" if errors is not None else "tab:gray")
    spread = float(values.max() - values.min()) if values.size else 0.0
    margin = max(spread * 0.3, 0.002) + (float(errors.max()) if errors is not None and errors.size else 0.0)
    ax.set_ylim(float(values.min()) - margin, float(values.max()) + margin)
    ax.set_xticks(range(len(values)))
    ax.set_xticklabels(labels, rotation=30, ha="right")
    ax.set_ylabel("GAUC")
    ax.set_title(title, fontsize=10)
    tops = values + (errors if errors is not None else 0.0)
    for x, (v, top) in enumerate(zip(values, tops)):
        ax.text(x, top, f"{v:.4f}", ha="center", va="bottom", fontsize=8)


@dataclass(frozen=True)
class CompareOptions:
    config: Path
    overrides: Tuple[str, ...]
    study: str
    methods: Optional[Tuple[str, ...]]
    seeds: int
    out: Path
    nproc: int = 1
    device: str = "auto"
    # Runs at a time. One by default: concurrent runs share the cores and memory bandwidth, which
    # skews every method's measured samples/s (2 runs on 2 cores: whole-history methods 2.3x slower).
    jobs: int = 1
    force: bool = False


def run_compare(opts: CompareOptions, command: str) -> Dict[str, object]:
    """Run (or reuse) every (method, seed) of the study and write its .md / .json / .png into ``opts.out``."""
    study = STUDIES[opts.study]
    methods = opts.methods or study.methods
    for name in methods:
        get_method(name)  # unknown names fail before any training
    if opts.seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {opts.seeds}")
    cfg = load_config(opts.config, opts.overrides)
    seeds = [cfg.train.seed + i for i in range(opts.seeds)]
    specs = run_specs(opts.config, opts.overrides, methods, seeds, opts.out)
    start = time.perf_counter()
    run_all(opts.config, specs, opts.nproc, opts.device, opts.jobs, opts.force)
    lookups = {method: lookups_per_sample(cfg, method) for method in methods}
    report = report_json(study, collect(specs, lookups), seeds, command, time.perf_counter() - start)
    opts.out.mkdir(parents=True, exist_ok=True)
    (opts.out / f"{study.stem}.json").write_text(json.dumps(report, indent=2))
    (opts.out / f"{study.stem}.md").write_text(report_markdown(report))
    plot(report, opts.out / f"{study.stem}.png")
    return report
