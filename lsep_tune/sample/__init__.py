"""Sampling: solvers (`solvers`), the one seed scheme (`generate`), many samples from a checkpoint
in-process or on Ray actors (`batch`), PNG grids (`grid`) and the command line (`__main__`)."""
from lsep_tune.sample.batch import generate_samples
from lsep_tune.sample.generate import generate, generate_chunk

__all__ = ["generate", "generate_chunk", "generate_samples"]
