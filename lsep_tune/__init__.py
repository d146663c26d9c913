"""lsep_tune: search the knobs of LSEP / SRA representation regularizers for SiT diffusion transformers."""

__version__ = "0.1.0"
