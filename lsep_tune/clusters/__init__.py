"""Deployment recipes checked before a cluster is paid for: `python -m lsep_tune.clusters check FILE...`.

Each kind of recipe (a Ray cluster-launcher YAML, a KubeRay RayCluster or RayJob, a Slurm sbatch
script) is one module that reads its file into a `Shape`: the node groups Ray will see and the
shared path every node mounts. `check` only dispatches and, with a search space, asks the
project's placement check whether one trial fits that shape. Nothing here imports torch or Ray
until a placement is asked for, so the command answers fast.
"""
