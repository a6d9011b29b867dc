"""Hydra's YAML config groups, shipped inside the package; importing registers the schemas."""
import flashmoe.config  # noqa: F401  (stores base_* schemas the YAML defaults lists extend)
