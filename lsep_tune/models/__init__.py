"""The SiT backbone (`sit`) and its sizes by name (`names`). Nothing is imported here: the config
checks `model.name` against `names` before torch loads."""
