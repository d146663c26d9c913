"""The training objective: flow matching plus the sum of the enabled regularizers.

`objective.TrainObjective` is the nn.Module; `configs` holds every regularizer's config without
torch, so a config is checked before torch loads. Nothing is imported here, for the same reason.

To add a regularizer: write its `RegularizerConfig` subclass (with the metrics it reports) in
configs.py and one line in REGULARIZER_CONFIGS, then one module with a `Regularizer` subclass whose
`Config` is that class, and one line in objective.REGULARIZERS. Its config appears as
`objective.<name>` and its checks run at load time.
"""
