"""Each regularizer's config, and what the objective reports, without torch: the config checks
`objective.<name>` and a search space its metric before torch loads.

Each `Regularizer` module sets `Config` to its class here; tests/test_startup.py checks that
REGULARIZER_CONFIGS and objective.REGULARIZERS name the same regularizers with the same configs.
"""
from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from lsep_tune.schema import FieldError, StrictModel

# What TrainObjective reports besides each enabled regularizer's own metrics.
OBJECTIVE_METRICS: dict[str, str | None] = {"loss": "min", "flow_loss": "min"}


class RegularizerConfig(StrictModel):
    # The metrics the regularizer's `forward` reports, each with the direction in which it improves (None:
    # neither); search spaces read them here, so a new regularizer's metrics are searchable without touching search/.
    metrics: ClassVar[dict[str, str | None]] = {}

    enabled: bool = False

    def check(self, depth: int, grid: int) -> None:
        """Raise schema.FieldError(field, message) when the setting does not fit the model."""


class LSEPConfig(RegularizerConfig):
    """LSEP's probe pass (objectives/lsep.py)."""

    metrics = {"lsep_ce": "min", "probe_acc": "max"}

    encoder_depth: int = Field(8, ge=1, description="the probe reads the tokens after this block")
    uncond_prob: float = Field(0.9, ge=0.0, le=1.0, description="label-drop probability of the probe pass")
    crop_start: int | None = Field(None, ge=1, description="smallest crop window side on the token grid; null = no crop")
    weights_type: Literal["constant", "steps"] = "steps"
    weight: float = Field(0.02, ge=0.0, description="lambda when weights_type is 'constant'")
    weight_start: float = Field(0.0225, ge=0.0, description="weight of the lowest-t bin ('steps')")
    weight_end: float = Field(0.03, ge=0.0, description="weight of the highest-t bin ('steps')")
    n_weights: int = Field(10, ge=1, description="number of equal t bins ('steps')")
    probe_lr: float = Field(1e-4, gt=0.0)
    probe_weight_decay: float = Field(0.0, ge=0.0)
    decay_start_step: int | None = Field(
        None, ge=0, description="after this step the loss is scaled by 0.1^((step - start) / decay_period); "
        "null = off. The published script intends this from epoch 100 over 800 epochs but never applies it")
    decay_period: int = Field(4_003_200, ge=1, description="steps per 10x decay (800 epochs of 1.28M / 256)")
    probe_init: Literal["xavier", "torch"] = Field(
        "xavier", description="'xavier': xavier-uniform Linear weight, zero bias (published); 'torch': nn.Linear's own")
    reuse_main_pass: bool = Field(True, description="take the main pass's block-k tokens for samples whose probe "
                                  "label equals their main label (same input, t and label) instead of recomputing")

    def check(self, depth: int, grid: int) -> None:
        if self.encoder_depth > depth:
            raise FieldError("encoder_depth", f"block depth {self.encoder_depth} is deeper than the model ({depth} blocks)")
        if self.crop_start is not None and self.crop_start > grid:
            raise FieldError("crop_start", f"{self.crop_start} is larger than the token grid ({grid})")


class SRAConfig(RegularizerConfig):
    """SRA's student head and EMA teacher (objectives/sra.py)."""

    metrics = {"sra_loss": "min"}

    block_out_s: int = Field(4, ge=1, description="student block (higher noise)")
    block_out_t: int = Field(8, ge=1, description="EMA-teacher block (lower noise)")
    t_max: float = Field(0.2, ge=0.0, le=1.0, description="teacher t = clamp(t - U(0, t_max), 0, 1)")
    loss_type: Literal["cos", "sml1", "l1", "l2"] = "cos"
    cos_axis: Literal["features", "tokens"] = Field(
        "features",
        description="'features': cosine per token over channels; 'tokens': per channel across tokens, "
        "which is what the published code's dim=1 call on (N, T, D) computes",
    )
    smooth_l1_beta: float = Field(0.05, gt=0.0)
    weight: float = Field(0.5, ge=0.0, description="the loss weight (before decay_start_epoch when decaying)")
    weight_schedule: Literal["constant", "epoch_decay"] = Field(
        "constant", description="'epoch_decay': weight * 0.1^((epoch - decay_start_epoch) / decay_period_epochs) "
        "after decay_start_epoch, the published non-cosine runs (epoch = step // steps per epoch)")
    decay_start_epoch: int = Field(149, ge=0, description="published: 149 at 256 px, 99 at 512 px")
    decay_period_epochs: float = Field(1000.0, gt=0.0, description="published: 1000 at 256 px, 800 at 512 px")
    head_mult: int = Field(2, ge=1, description="student head: hidden -> head_mult*hidden -> hidden")
    head_init: Literal["xavier", "torch"] = Field(
        "xavier", description="'xavier': xavier-uniform weights, zero biases (published); 'torch': nn.Linear's own")

    def check(self, depth: int, grid: int) -> None:
        for name in ("block_out_s", "block_out_t"):
            value = getattr(self, name)
            if value > depth:
                raise FieldError(name, f"block depth {value} is deeper than the model ({depth} blocks)")


class REPAConfig(RegularizerConfig):
    """REPA's projector onto a frozen encoder's tokens (objectives/repa.py)."""

    metrics = {"repa_loss": "min"}

    encoder_depth: int = Field(4, ge=1, description="align the tokens after this block (REPA: 4 for B, 8 for XL)")
    weight: float = Field(0.5, ge=0.0, description="lambda")
    projector_dim: int = Field(2048, ge=1)
    encoder: str = Field("vit_base_patch14_dinov2.lvd142m",
                         description="timm name of the frozen encoder; must match `preprocess --encoder`")
    encoder_dim: int = Field(768, ge=1, description="channels of the encoder's patch tokens (768: ViT-B)")

    def check(self, depth: int, grid: int) -> None:
        if self.encoder_depth > depth:
            raise FieldError("encoder_depth", f"block depth {self.encoder_depth} is deeper than the model ({depth} blocks)")


# `objective.<name>` of the config, in this order; objective.REGULARIZERS holds their modules.
REGULARIZER_CONFIGS: dict[str, type[RegularizerConfig]] = {
    "lsep": LSEPConfig,
    "sra": SRAConfig,
    "repa": REPAConfig,
}
