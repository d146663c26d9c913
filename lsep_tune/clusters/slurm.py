"""Slurm sbatch scripts: the allocation their #SBATCH lines ask for, and the Ray they start on it.

What lsep_tune relies on in such a script: a Ray head (`ray start --head`) and workers joining it
(`ray start --address`) through srun, the search (`python -m lsep_tune.search`) as the batch step,
a trap that ends the job's Ray, and the search running from a shared folder (a `cd` or --chdir).
The allocation as shipped is the shape; sbatch options given at submission override it.
"""
from __future__ import annotations

import re
import shlex

from lsep_tune.clusters.shape import NodeGroup, Shape
from lsep_tune.errors import InputError

KIND = "Slurm sbatch"
NEEDED = (
    (r"\bray start\b[^\n]*--head", "a Ray head started by `srun ... ray start --head --block`"),
    (r"\bray start\b[^\n]*--address", "Ray workers on the other nodes, `srun ... ray start --address=HEAD:PORT`"),
    (r"-m lsep_tune\.search\b", "the search, `python -m lsep_tune.search \"$@\"`"),
    (r"^\s*trap\s+[^-\s].*\b(EXIT|TERM)\b",
     "a trap that stops the job's own Ray steps when the search ends or the job is cancelled"),
    (r"^\s*cd\b", "a `cd` to the shared folder the search folder lives in"),
)


def matches(text: str) -> bool:
    return text.startswith("#!") and "#SBATCH" in text


def directives(text: str) -> dict[str, str]:
    """The script's #SBATCH options ({'nodes': '2', 'gpus-per-node': '8'}), up to its first command."""
    found = {}
    for line in text.splitlines():
        if line.startswith("#SBATCH"):
            for word in shlex.split(line[len("#SBATCH"):], comments=True):
                key, _, value = word.lstrip("-").partition("=")
                found[key] = value
        elif line.strip() and not line.startswith("#"):
            break  # sbatch reads no directives after the first command
    return found


def _count(options: dict[str, str], key: str, default: str, source: str) -> float:
    value = options.get(key, default)
    if key == "nodes":
        value = value.split("-")[-1]  # a range: the most it may get
    if key == "gres":
        match = re.search(r"gpu(?::[^:,]+)?:(\d+)", value)
        value = match.group(1) if match else "0"
    try:
        return float(value.split(":")[-1])
    except ValueError:
        raise InputError(source, f"#SBATCH --{key}", f"expected a number, got {value}") from None


def check(text: str, source: str, placement: bool) -> Shape:
    options = directives(text)
    body = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    for pattern, expectation in NEEDED:
        if not re.search(pattern, body, re.MULTILINE):
            raise InputError(source, "script", f"expected {expectation}")
    nodes = int(_count(options, "nodes", "1", source))
    cpus = _count(options, "cpus-per-task", "1", source) * _count(options, "ntasks-per-node", "1", source)
    if "gpus-per-node" in options:
        gpus = _count(options, "gpus-per-node", "0", source)
    else:
        gpus = _count(options, "gres", "", source) if "gres" in options else 0.0
    fields = ("#SBATCH --cpus-per-task", "#SBATCH --gpus-per-node")
    groups = [NodeGroup("head", 1, cpus, gpus, *fields)]
    if nodes > 1:
        groups.append(NodeGroup("workers", nodes - 1, cpus, gpus, *fields))
    where = "the search's working folder ($LSEP_TUNE_SHARED, else the submit folder)"
    return Shape(KIND, groups, where, notes=[f"time {options.get('time', 'the partition default')}"])
