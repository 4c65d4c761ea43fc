"""Files copied into exported folders: each imports only diffusers, torch and transformers."""

from pathlib import Path

SHIPPED_DIR = Path(__file__).resolve().parent


def shipped_file(module: str) -> Path:
    """The source file of the shipped module ``module`` (e.g. ``"pipeline_nasa"``), to copy into an exported folder."""
    return SHIPPED_DIR / f"{module}.py"
