"""Reproducibility tools: tensor/file diffs (:mod:`.diff`) and step traces (:mod:`.trace`)."""
