"""Analytic FLOPs of one training image, and the device peaks that turn them into MFU.

Counted: every matmul of SiT (2 FLOPs per multiply-add), per image:
  patch embed 2*T*(p*p*C)*D; timestep MLP 2*(256*D + D*D);
  per block: adaLN 2*D*6D, QKV 2*T*D*3D, scores QK^T 2*T*T*D, scores x V 2*T*T*D, proj 2*T*D*D, MLP 2*T*D*8D
    (= 24*T*D^2 + 4*T^2*D + 12*D^2);
  final layer: adaLN 2*D*2D, linear 2*T*D*(p*p*C).
A training pass costs 3x its forward (backward = 2x forward). On top of the flow pass:
  LSEP: the probe pass through blocks 1..k, forward and backward, for the share r of samples that
        it recomputes (r = p_u (1 - p_c) + p_c (1 - p_u) with reuse, 1 without), plus the probe head;
  SRA:  the EMA teacher through blocks 1..block_out_t, forward only, plus the student head
        (D -> mD -> D over all tokens, forward and backward).
Norms, activations, softmax and the optimizer are left out: they are memory-bound, not FLOPs.
"""
from __future__ import annotations

from lsep_tune.config import Config
from lsep_tune.models.names import parse_model_name

# Dense peak FLOP/s by device name fragment (first match wins) and precision. fp32 runs with TF32
# matmuls on these GPUs (the loop turns TF32 on). Sources: NVIDIA H100 / H200 / A100 datasheets.
DEVICE_PEAKS: list[tuple[str, dict[str, float]]] = [
    ("H100 PCIe", {"bf16": 756.5e12, "fp16": 756.5e12, "fp32": 378e12}),
    ("H100 NVL", {"bf16": 835.5e12, "fp16": 835.5e12, "fp32": 417.5e12}),
    ("H100", {"bf16": 989.4e12, "fp16": 989.4e12, "fp32": 494.7e12}),  # SXM
    ("H200", {"bf16": 989.4e12, "fp16": 989.4e12, "fp32": 494.7e12}),  # SXM: H100's compute, more memory
    ("A100", {"bf16": 312e12, "fp16": 312e12, "fp32": 156e12}),
]


def device_peak(device_name: str | None, precision: str) -> float | None:
    """Peak FLOP/s of a named GPU at a precision; None for CPUs and unknown devices."""
    if not device_name:
        return None
    for fragment, peaks in DEVICE_PEAKS:
        if fragment in device_name:
            return peaks[precision]
    return None


def forward_parts(cfg: Config) -> dict[str, float]:
    """FLOPs of one image's forward: 'embed' (patch + timestep), 'block' (one block), 'final'."""
    m = parse_model_name(cfg.model.name)
    p, d = m["patch_size"], m["hidden_size"]
    c = cfg.model.in_channels
    t = (cfg.model.input_size // p) ** 2
    return {
        "embed": 2 * t * p * p * c * d + 2 * (256 * d + d * d),
        "block": 24 * t * d * d + 4 * t * t * d + 12 * d * d,
        "final": 2 * d * 2 * d + 2 * t * d * p * p * c,
        "tokens": t,
        "hidden": d,
        "depth": m["depth"],
    }


def lsep_recompute_share(cfg: Config) -> float:
    """Share of samples whose probe pass runs again: those whose probe and main labels differ."""
    lsep = cfg.objective.lsep
    if not lsep.reuse_main_pass:
        return 1.0
    pu, pc = lsep.uncond_prob, cfg.objective.flow.class_dropout_prob
    return pu * (1 - pc) + pc * (1 - pu)


def train_flops_per_image(cfg: Config) -> dict[str, float]:
    """{'flow': ..., 'lsep': ..., 'sra': ..., 'total': ...} FLOPs of one image's training step."""
    f = forward_parts(cfg)
    out = {"flow": 3 * (f["embed"] + f["depth"] * f["block"] + f["final"]), "lsep": 0.0, "sra": 0.0, "repa": 0.0}
    lsep, sra, repa = cfg.objective.lsep, cfg.objective.sra, cfg.objective.repa
    if lsep.enabled:
        probe = 2 * f["hidden"] * cfg.model.num_classes
        out["lsep"] = 3 * (lsep_recompute_share(cfg) * (f["embed"] + lsep.encoder_depth * f["block"]) + probe)
    if sra.enabled:
        head = 2 * f["tokens"] * 2 * sra.head_mult * f["hidden"] ** 2
        out["sra"] = f["embed"] + sra.block_out_t * f["block"] + 3 * head
    if repa.enabled:  # the projector MLP on every token of the main pass (the encoder ran in preprocess)
        p = repa.projector_dim
        out["repa"] = 3 * 2 * f["tokens"] * (f["hidden"] * p + p * p + p * repa.encoder_dim)
    out["total"] = out["flow"] + out["lsep"] + out["sra"] + out["repa"]
    return out
