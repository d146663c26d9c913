"""The code MLflow runs to rebuild a logged lsep_tune model (MLflow's models-from-code: the model is
this file plus its artifacts, no pickled object)."""
from mlflow.models import set_model

from lsep_tune.mlflow_model import SamplerModel

set_model(SamplerModel())
