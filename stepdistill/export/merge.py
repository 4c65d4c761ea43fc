"""Weight merging of two students (Cideron et al., "Diversity-Rewarded CFG Distillation", ICLR 2025,
arXiv:2410.06084, §3.3; model soups / WiSE-FT): θ(λ) = (1 − λ)·θ_a + λ·θ_b for two students fine-tuned from the same
initialisation (e.g. a quality student, β = 0, and a diversity-rewarded one), so that the quality–diversity trade-off is
picked at deployment without retraining.

Both inputs are exported student folders (``stepdistill_export.json``). Their UNets are interpolated tensor by tensor in
float32 (LoRA students are merged through the full UNets their folders hold: (1 − λ)(W + ΔW_a) + λ(W + ΔW_b) is exactly
W + the interpolated ΔW); every other component (VAE, text encoder, tokenizer, scheduler) is copied from ``a``. Refused
with a clear error: different UNet configs or tensor names/shapes (not one architecture), different VAE / text-encoder
weights or base models (not one base), or different samplers (steps, timesteps, scheduler).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any, Sequence

from stepdistill.core.outputs import check_output_folder, staged_folder
from stepdistill.core.yaml_io import load_yaml_file

INFO = "stepdistill_export.json"
UNET_WEIGHTS = "unet/diffusion_pytorch_model.safetensors"
SAMPLER_KEYS = ("steps", "timesteps", "scheduler", "prediction_type", "guidance_scale", "scaled_input_noise")
VOLATILE_CONFIG = {"_name_or_path", "_diffusers_version"}


class MergeError(ValueError):
    """Two students that cannot be merged; the message says why and what to do."""


def _info(folder: Path) -> dict[str, Any]:
    path = folder / INFO
    if not path.is_file():
        raise MergeError(f"{folder} is not an exported stepdistill student ({INFO} not found): merge the folders "
                         "`stepdistill distill` or `stepdistill export` wrote")
    if not (folder / UNET_WEIGHTS).is_file():
        raise MergeError(f"{folder / UNET_WEIGHTS} not found: only single-UNet student folders can be merged "
                         "(not phased or multi-student folders)")
    return json.loads(path.read_text(encoding="utf-8"))


def _digest(folder: Path, component: str) -> str | None:
    """sha256 over a component's weight files (None when the folder has no such component)."""
    sub = folder / component
    if not sub.is_dir():
        return None
    h = hashlib.sha256()
    for f in sorted(sub.glob("*.safetensors")):
        h.update(f.name.encode())
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def check_mergeable(a: str | Path, b: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Both folders' export info, after every check in the module docstring (raises :class:`MergeError`)."""
    a, b = Path(a), Path(b)
    info_a, info_b = _info(a), _info(b)
    if info_a.get("base_model") != info_b.get("base_model") or info_a.get("family") != info_b.get("family"):
        raise MergeError(f"{a} and {b} were distilled from different bases ({info_a.get('base_model')} vs "
                         f"{info_b.get('base_model')}): merge students of one teacher")
    for component in ("vae", "text_encoder", "text_encoder_2"):
        if _digest(a, component) != _digest(b, component):
            raise MergeError(f"{a} and {b} have different {component} weights: they do not share a base")
    conf_a, conf_b = (json.loads((f / "unet" / "config.json").read_text()) for f in (a, b))
    conf_a, conf_b = ({k: v for k, v in c.items() if k not in VOLATILE_CONFIG} for c in (conf_a, conf_b))
    if conf_a != conf_b:
        diff = sorted(k for k in set(conf_a) | set(conf_b) if conf_a.get(k) != conf_b.get(k))
        raise MergeError(f"{a} and {b} have different UNet architectures ({', '.join(diff)} differ): only students "
                         "of one architecture and initialisation can be merged")
    for key in SAMPLER_KEYS:
        if info_a.get(key) != info_b.get(key):
            raise MergeError(f"{a} and {b} sample differently ({key}: {info_a.get(key)!r} vs {info_b.get(key)!r}): "
                             "merge students of one recipe family (same steps and scheduler)")
    return info_a, info_b


def _load_unet_weights(folder: Path) -> dict:
    """The UNet tensors of a student folder; a truncated or damaged file is a :class:`MergeError` naming it."""
    from safetensors.torch import load_file

    path = folder / UNET_WEIGHTS
    try:
        return load_file(str(path))
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types without the file name
        raise MergeError(f"cannot read {path} ({type(e).__name__}: {' '.join(str(e).split())}): the file is "
                         "truncated or damaged; export that student again") from None


def merge_students(a: str | Path, b: str | Path, alpha: float, out: str | Path, overwrite: bool = False) -> Path:
    """Write θ = (1 − alpha)·θ_a + alpha·θ_b as a student folder at ``out`` (atomically); returns ``out``. ``out`` may
    be absent, empty or an earlier student folder; anything else is refused unless ``overwrite``, and ``a`` or ``b``
    (or a folder holding them) always."""
    from safetensors.torch import save_file

    if not 0.0 <= float(alpha) <= 1.0:
        raise MergeError(f"--alpha must lie in [0, 1] (an interpolation), got {alpha}")
    a, b = Path(a), Path(b)
    out = check_output_folder(out, overwrite=overwrite, protect=[a, b])
    info_a, info_b = check_mergeable(a, b)
    sd_a, sd_b = _load_unet_weights(a), _load_unet_weights(b)
    if sd_a.keys() != sd_b.keys() or any(sd_a[k].shape != sd_b[k].shape for k in sd_a):
        raise MergeError(f"{a} and {b} hold UNet tensors of different names or shapes: not one architecture")
    lam = float(alpha)
    merged = {k: ((1.0 - lam) * sd_a[k].float() + lam * sd_b[k].float()).to(sd_a[k].dtype).contiguous() for k in sd_a}
    with staged_folder(out, "the merged student") as tmp:
        shutil.copytree(a, tmp, ignore=shutil.ignore_patterns("pytorch_lora_weights.safetensors"))
        save_file(merged, str(tmp / UNET_WEIGHTS), metadata={"format": "pt"})
        info = dict(info_a, lora=False, lora_file=None,
                    merge={"a": str(a.resolve()), "b": str(b.resolve()), "alpha": lam,
                           "method_a": info_a.get("method"), "method_b": info_b.get("method")})
        (tmp / INFO).write_text(json.dumps(info, indent=2, default=str), encoding="utf-8")
        card = (tmp / "README.md").read_text(encoding="utf-8") if (tmp / "README.md").is_file() else ""
        (tmp / "README.md").write_text(
            card + f"\n\n## Merged weights\n\nθ = (1 − λ)·θ_a + λ·θ_b with λ = {lam}, a = `{a}`, b = `{b}` "
            "(`stepdistill merge`); load and call it exactly as above. It ships no LoRA file.\n", encoding="utf-8")
    return out


def merge_sweep(a: str | Path, b: str | Path, alphas: Sequence[float], out_dir: str | Path,
                suite_template: str | Path | None = None, overwrite: bool = False) -> dict[str, Any]:
    """One merged folder per λ (``<out_dir>/lambda_<λ>``) and ``<out_dir>/front.yaml``, a bench suite of them (the
    toy-quality protocol of ``suite_template``, default eval/toy-students.yaml's header) whose report plots the
    quality–diversity front; returns {"folders": [...], "suite": path}."""
    import yaml

    out = Path(out_dir)
    for lam in alphas:  # every folder checked before the first is written
        check_output_folder(out / f"lambda_{lam:g}", overwrite=overwrite, protect=[a, b])
    out.mkdir(parents=True, exist_ok=True)
    folders = [merge_students(a, b, lam, out / f"lambda_{lam:g}", overwrite=overwrite) for lam in alphas]
    info = json.loads((Path(a) / INFO).read_text(encoding="utf-8"))
    template: dict[str, Any] = {}
    if suite_template is not None:
        template = load_yaml_file(suite_template) or {}
    suite = {k: v for k, v in template.items() if k not in ("entries", "suite", "description")}
    suite.update(suite="merge-front", description=f"θ(λ) = (1 − λ)·θ_a + λ·θ_b, a = {a}, b = {b}", front=True,
                 entries=[{"name": f"lambda_{lam:g}", "role": "student", "pipeline": str(f.resolve()),
                           "steps": int(info.get("steps") or 1), "guidance": 1.0} for lam, f in zip(alphas, folders)])
    (out / "front.yaml").write_text(yaml.safe_dump(suite, sort_keys=False), encoding="utf-8")
    return {"folders": [str(f) for f in folders], "suite": str(out / "front.yaml")}
