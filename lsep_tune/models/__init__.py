from lsep_tune.models.sit import SiT, create_model, model_names, parse_model_name, sit_from_config

__all__ = ["SiT", "create_model", "model_names", "parse_model_name", "sit_from_config"]
