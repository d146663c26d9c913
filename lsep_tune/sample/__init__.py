"""Sampling: solvers and their registry (`solvers`), the one seed scheme (`generate`), many samples
from a checkpoint in-process or on Ray actors (`batch`), PNG grids (`grid`) and the command line
(`__main__`). Nothing is imported here: the config validates `sampling.mode` against `options`,
without torch."""
