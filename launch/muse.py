"""torchx components for muse_torchrec.

    torchx run -s local_cwd launch/muse.py:train --nnodes 1 --nproc_per_node 2 --config configs/demo_cpu.yaml
    torchx run -s slurm launch/muse.py:train --nnodes 4 --nproc_per_node 8 --gpu 8 --config configs/taobao_mm_full.yaml
    torchx run -s local_cwd launch/muse.py:plan --config configs/taobao_mm_full.yaml --world_size 8

The same ``train`` component serves every scheduler (local_cwd, slurm, kubernetes...): it launches
``python -m muse_torchrec.cli train`` through torch.distributed.run (torchelastic) on every node.
The application itself never imports torchx.

Fault tolerance: ``--max_restarts N`` lets torchelastic restart the whole worker group up to N times
when a rank fails; the restarted ranks resume from the run_dir's latest checkpoint
(``train.resume``, on by default), so nothing else is needed. torchx's ``dist.ddp`` maps its
``max_retries`` only to scheduler-level retries of a replica (what replaces a lost node on Slurm or
Kubernetes; the local scheduler ignores it) and passes no ``--max-restarts`` to torchrun, so the
component also sets torchrun's own setting through its environment variable ``PET_MAX_RESTARTS``.
It also sets ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``: by default torchrun's c10d rendezvous lends
its store to the workers and keeps it across restarts, so a restarted rank can read the process
group addresses of the attempt that failed and fail to connect (pytorch/pytorch#135712); with the
variable every attempt's rank 0 hosts a fresh store. Set both when launching torchrun by hand.
"""

from typing import Dict, Optional

import torchx.specs as specs
from torchx.components import dist

MODULE = "muse_torchrec.cli"


def _override_args(overrides: str) -> list:
    """``"a.b=1;c.d=x"`` -> ``["--set", "a.b=1", "--set", "c.d=x"]`` (';' because values may hold commas)."""
    args = []
    for item in filter(None, (part.strip() for part in overrides.split(";"))):
        if "=" not in item:
            raise ValueError(f"--overrides: {item!r} is not of the form key.path=value")
        args += ["--set", item]
    return args


def train(
    config: str = "configs/demo_cpu.yaml",
    overrides: str = "",
    nnodes: int = 1,
    nproc_per_node: int = 1,
    gpu: int = 0,
    cpu: int = 2,
    memMB: int = 8192,
    image: str = "",
    max_restarts: int = 0,
    env: Optional[Dict[str, str]] = None,
    name: str = "muse-train",
) -> specs.AppDef:
    """Train then evaluate MUSE with DistributedModelParallel on nnodes x nproc_per_node ranks.

    Args:
        config: experiment YAML (configs/*.yaml)
        overrides: config overrides separated by ';', e.g. "train.batch_size=512;model.k=20"
        nnodes: number of nodes
        nproc_per_node: processes per node (one per GPU on GPU hosts)
        gpu: GPUs per node (0 = CPU training with gloo)
        cpu: CPUs per node
        memMB: host memory per node in MB
        image: container image (local_cwd: unused, runs in the current directory)
        max_restarts: restarts of the whole job when a rank fails (torchelastic) or a node is lost
            (scheduler retries); each restart resumes from the latest checkpoint
        env: extra environment variables, e.g. NCCL_DEBUG=INFO
        name: job name
    """
    if nnodes < 1 or nproc_per_node < 1:
        raise ValueError("nnodes and nproc_per_node must be >= 1")
    if gpu and gpu < nproc_per_node:
        raise ValueError(f"nproc_per_node={nproc_per_node} needs as many GPUs per node (gpu={gpu})")
    run_env = {
        "OMP_NUM_THREADS": "1",
        "PET_MAX_RESTARTS": str(max_restarts),
        "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1",
        **(env or {}),
    }
    return dist.ddp(
        "train", "--config", config, *_override_args(overrides),
        m=MODULE,
        image=image,
        name=name,
        j=f"{nnodes}x{nproc_per_node}",
        gpu=gpu,
        cpu=cpu,
        memMB=memMB,
        env=run_env,
        max_retries=max_restarts,
    )


def plan(
    config: str = "configs/taobao_mm_full.yaml",
    world_size: int = 8,
    nodes: int = 1,
    hbm_gb: float = 0.0,
    ddr_gb: float = 0.0,
    overrides: str = "",
    image: str = "",
) -> specs.AppDef:
    """Print the sharding plan and per-rank memory estimate for a target cluster (no GPU needed).

    Args:
        config: experiment YAML (configs/*.yaml)
        world_size: total number of GPU ranks of the target cluster
        nodes: number of nodes of the target cluster
        hbm_gb: GPU memory per rank in GiB (0 = the planner's default)
        ddr_gb: host memory per rank in GiB (0 = the planner's default)
        overrides: config overrides separated by ';'
        image: container image (local_cwd: unused)
    """
    args = ["-m", MODULE, "plan", "--config", config, "--world-size", str(world_size), "--nodes", str(nodes)]
    if hbm_gb > 0:
        args += ["--hbm-gb", str(hbm_gb)]
    if ddr_gb > 0:
        args += ["--ddr-gb", str(ddr_gb)]
    args += _override_args(overrides)
    return specs.AppDef(
        name="muse-plan",
        roles=[specs.Role(name="plan", image=image, entrypoint="python", args=args,
                          resource=specs.Resource(cpu=1, gpu=0, memMB=4096))],
    )
