"""The Inception-v3 that FID is defined with (the 2015-12-05 TensorFlow release), and where its weights are found.

* :class:`InceptionV3Features` — written with plain ``torch.nn`` modules (no torchvision), with the module and
  parameter names of the PyTorch port in mseitzer/pytorch-fid (``FIDInceptionA/C/E``) so that its published state
  dict loads directly; alternatively the TorchScript export of the same weights that NVIDIA's StyleGAN2-ADA and
  clean-fid (GaParmar/clean-fid) use. :meth:`InceptionV3Features.extract` runs the clean preprocessing of
  :mod:`stepdistill.eval.fid` (quantise to uint8, PIL bicubic float resize to 299) before the network.
* :func:`resolve_inception_path` — the weights file from a path the user gives, ``$STEPDISTILL_INCEPTION`` or the
  documented cache folder; :class:`~stepdistill.eval.errors.MetricUnavailable` with instructions otherwise.

Nothing here downloads anything: weights are read from a path the user gives.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Mapping

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from stepdistill.eval.errors import MetricUnavailable
from stepdistill.eval.fid import clean_resize, quantize_images

__all__ = [
    "InceptionV3Features",
    "resolve_inception_path",
    "default_inception_dir",
    "INCEPTION_ENV_VAR",
    "INCEPTION_STATE_DICT_NAME",
    "INCEPTION_TORCHSCRIPT_NAME",
    "INCEPTION_FEATURES_NAME",
]

INCEPTION_ENV_VAR = "STEPDISTILL_INCEPTION"
INCEPTION_STATE_DICT_NAME = "pt_inception-2015-12-05-6726825d.pth"
INCEPTION_TORCHSCRIPT_NAME = "inception-2015-12-05.pt"
INCEPTION_FEATURES_NAME = "inception-v3-2015-12-05-pool3"


def default_inception_dir() -> Path:
    """The documented cache folder searched when no path is given: ``$XDG_CACHE_HOME/stepdistill/inception``
    (``~/.cache/stepdistill/inception`` by default)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "stepdistill" / "inception"


def _inception_help(where: str) -> str:
    return (
        f"FID needs the Inception-v3 weights of the 2015-12-05 TensorFlow release ported to PyTorch; {where}. "
        f"Either public form works: '{INCEPTION_STATE_DICT_NAME}' (the state dict attached to the 'fid_weights' "
        "release of the pytorch-fid GitHub project, mseitzer/pytorch-fid; torch-fidelity uses the same file) or "
        f"'{INCEPTION_TORCHSCRIPT_NAME}' (the TorchScript file NVIDIA publishes with the StyleGAN2-ADA metrics, "
        "which clean-fid also uses). stepdistill never downloads it: fetch it on a machine with internet access, "
        f"copy it here, and pass --inception PATH (the file, or a folder containing it) or set {INCEPTION_ENV_VAR}=PATH; "
        f"a file placed in {default_inception_dir()} is also found."
    )


def resolve_inception_path(path: str | os.PathLike | None = None) -> Path:
    """The Inception weights file from ``path`` (file or folder), else ``$STEPDISTILL_INCEPTION``, else the cache
    folder; :class:`MetricUnavailable` with instructions when nothing is found."""
    if path is None:
        path = os.environ.get(INCEPTION_ENV_VAR) or None
        origin = f"${INCEPTION_ENV_VAR}" if path else None
    else:
        origin = "the given path"
    candidate = Path(path) if path is not None else default_inception_dir()
    if candidate.is_file():
        return candidate
    if candidate.is_dir():
        found = sorted(candidate.glob("pt_inception-2015-12-05*.pth")) + sorted(candidate.glob(INCEPTION_TORCHSCRIPT_NAME))
        if found:
            return found[0]
        raise MetricUnavailable(_inception_help(f"the folder {candidate} ({origin or 'default cache'}) holds neither file"))
    if origin is None:
        raise MetricUnavailable(_inception_help(f"no path was given, {INCEPTION_ENV_VAR} is not set and {candidate} does not exist"))
    raise MetricUnavailable(_inception_help(f"{candidate} ({origin}) does not exist"))


def _is_torchscript(path: Path) -> bool:
    """TorchScript archives hold a ``code/`` folder and ``constants.pkl``; ``torch.save`` archives do not."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any("/code/" in name or name.endswith("/constants.pkl") for name in archive.namelist())


class _ConvBN(nn.Module):
    """Convolution (no bias) + batch norm (eps 1e-3, as in the TF graph) + ReLU; pytorch-fid's ``BasicConv2d``."""

    def __init__(self, cin: int, cout: int, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)), inplace=True)


def _tf_avg_pool(x):
    """3×3 stride-1 average pool that, like TensorFlow's, ignores the zero padding in the average."""
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class _BlockA(nn.Module):
    """35×35 block (Mixed_5b/c/d), FID variant of InceptionA: padding-excluding average pool."""

    def __init__(self, cin: int, pool_features: int):
        super().__init__()
        self.branch1x1 = _ConvBN(cin, 64, 1)
        self.branch5x5_1 = _ConvBN(cin, 48, 1)
        self.branch5x5_2 = _ConvBN(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = _ConvBN(cin, 64, 1)
        self.branch3x3dbl_2 = _ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _ConvBN(96, 96, 3, padding=1)
        self.branch_pool = _ConvBN(cin, pool_features, 1)

    def forward(self, x):
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(_tf_avg_pool(x))
        return torch.cat([b1, b5, b3, bp], dim=1)


class _ReductionB(nn.Module):
    """35×35 -> 17×17 reduction (Mixed_6a, InceptionB)."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = _ConvBN(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = _ConvBN(cin, 64, 1)
        self.branch3x3dbl_2 = _ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _ConvBN(96, 96, 3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3(x)
        bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([b3, bd, bp], dim=1)


class _BlockC(nn.Module):
    """17×17 block with factorised 7×7 convolutions (Mixed_6b..e), FID variant of InceptionC."""

    def __init__(self, cin: int, c7: int):
        super().__init__()
        self.branch1x1 = _ConvBN(cin, 192, 1)
        self.branch7x7_1 = _ConvBN(cin, c7, 1)
        self.branch7x7_2 = _ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = _ConvBN(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = _ConvBN(cin, c7, 1)
        self.branch7x7dbl_2 = _ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = _ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = _ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = _ConvBN(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = _ConvBN(cin, 192, 1)

    def forward(self, x):
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            bd = layer(bd)
        bp = self.branch_pool(_tf_avg_pool(x))
        return torch.cat([b1, b7, bd, bp], dim=1)


class _ReductionD(nn.Module):
    """17×17 -> 8×8 reduction (Mixed_7a, InceptionD)."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1 = _ConvBN(cin, 192, 1)
        self.branch3x3_2 = _ConvBN(192, 320, 3, stride=2)
        self.branch7x7x3_1 = _ConvBN(cin, 192, 1)
        self.branch7x7x3_2 = _ConvBN(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = _ConvBN(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = _ConvBN(192, 192, 3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        bp = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([b3, b7, bp], dim=1)


class _BlockE(nn.Module):
    """8×8 block with expanded filter banks (Mixed_7b/c). The FID graph pools differently in the two copies:
    Mixed_7b uses the padding-excluding average pool, Mixed_7c a 3×3 *max* pool (pytorch-fid's FIDInceptionE_1 and
    FIDInceptionE_2)."""

    def __init__(self, cin: int, pool: str):
        super().__init__()
        if pool not in ("avg", "max"):
            raise ValueError(pool)
        self.pool = pool
        self.branch1x1 = _ConvBN(cin, 320, 1)
        self.branch3x3_1 = _ConvBN(cin, 384, 1)
        self.branch3x3_2a = _ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = _ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = _ConvBN(cin, 448, 1)
        self.branch3x3dbl_2 = _ConvBN(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = _ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = _ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = _ConvBN(cin, 192, 1)

    def forward(self, x):
        b1 = self.branch1x1(x)
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], dim=1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], dim=1)
        pooled = _tf_avg_pool(x) if self.pool == "avg" else F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        return torch.cat([b1, b3, bd, self.branch_pool(pooled)], dim=1)


class InceptionV3Features(nn.Module):
    """2048-d pool3 features of the FID Inception-v3 (TF 2015-12-05 weights).

    ``forward(x)`` takes float images (N, 3, 299, 299) with values in [0, 255] (already resized — use
    :meth:`extract` for the whole clean pipeline) and returns (N, 2048).

    Two back-ends, same features:

    * the network below (plain ``torch.nn``), whose parameter names are those of pytorch-fid's port
      (``Conv2d_1a_3x3.conv.weight``, ``Mixed_5b.branch_pool.bn.running_var``, ..., ``fc.weight`` with 1008 classes)
      so that ``pt_inception-2015-12-05-*.pth`` loads as is. The input is normalised as the TF graph does,
      (x − 128) / 128; pytorch-fid's own wrapper maps [0, 1] with 2x − 1, i.e. (x − 127.5) / 127.5 on 0..255 input,
      a difference of under 0.4 % of the input scale;
    * the TorchScript file ``inception-2015-12-05.pt``, called as StyleGAN2-ADA's metrics do,
      ``model(x, return_features=True)`` on 0..255 input. At 299×299 its internal resampling is the identity and
      it normalises with (x − 128) / 128, so this equals clean-fid's ``model.layers((x − 128) / 128)``.
    """

    name = INCEPTION_FEATURES_NAME
    feature_dim = 2048
    input_size = 299

    def __init__(self, torchscript: torch.jit.ScriptModule | None = None):
        super().__init__()
        self.backend = "torchscript" if torchscript is not None else "torch"
        if torchscript is not None:
            self.torchscript = torchscript
            self.eval()
            self.requires_grad_(False)
            return
        self.Conv2d_1a_3x3 = _ConvBN(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = _ConvBN(32, 32, 3)
        self.Conv2d_2b_3x3 = _ConvBN(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = _ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = _ConvBN(80, 192, 3)
        self.Mixed_5b = _BlockA(192, pool_features=32)
        self.Mixed_5c = _BlockA(256, pool_features=64)
        self.Mixed_5d = _BlockA(288, pool_features=64)
        self.Mixed_6a = _ReductionB(288)
        self.Mixed_6b = _BlockC(768, c7=128)
        self.Mixed_6c = _BlockC(768, c7=160)
        self.Mixed_6d = _BlockC(768, c7=160)
        self.Mixed_6e = _BlockC(768, c7=192)
        self.Mixed_7a = _ReductionD(768)
        self.Mixed_7b = _BlockE(1280, pool="avg")
        self.Mixed_7c = _BlockE(2048, pool="max")
        # The 1008-way classifier of the TF graph: unused for FID, kept so the published state dict loads strictly.
        self.fc = nn.Linear(2048, 1008)
        self.eval()
        self.requires_grad_(False)

    # -- loading ----------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike | None = None, device: str | torch.device = "cpu") -> "InceptionV3Features":
        """Load ``pt_inception-2015-12-05-*.pth`` (state dict) or ``inception-2015-12-05.pt`` (TorchScript) from
        ``path`` (file or folder), ``$STEPDISTILL_INCEPTION`` or the cache folder. Never downloads."""
        file = resolve_inception_path(path)
        try:
            if _is_torchscript(file):
                model = cls(torchscript=torch.jit.load(str(file), map_location="cpu").eval())
            else:
                state = torch.load(str(file), map_location="cpu", weights_only=True)
                if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
                    state = state["state_dict"]
                with torch.device("meta"):  # no random initialisation of weights about to be overwritten
                    model = cls()
                model.load_inception_state_dict(state, source=str(file), assign=True)
        except MetricUnavailable:
            raise
        except Exception as err:
            raise MetricUnavailable(
                f"{file} could not be read as Inception-v3 FID weights ({type(err).__name__}: {err}). "
                + _inception_help("the file given is not one of them")
            ) from err
        return model.to(device).eval()

    def load_inception_state_dict(self, state: Mapping[str, torch.Tensor], source: str = "state dict",
                                  assign: bool = False) -> None:
        """Load a pytorch-fid-layout state dict; BatchNorm ``num_batches_tracked`` counters may be absent. Any
        other missing or unexpected key is an error naming the file and the keys. ``assign=True`` (used for a model
        built on the meta device) takes the given tensors instead of copying into existing ones."""
        if self.backend != "torch":
            raise RuntimeError("a TorchScript-backed model has no state dict to load")
        state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
        state = {k: v for k, v in state.items() if not k.startswith("AuxLogits.")}
        result = self.load_state_dict(state, strict=False, assign=assign)
        for module in self.modules():  # counters absent from the file: plain zeros (they do not affect eval)
            if isinstance(module, nn.BatchNorm2d) and module.num_batches_tracked is not None \
                    and module.num_batches_tracked.is_meta:
                module.num_batches_tracked = torch.zeros((), dtype=torch.long)
        missing = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
        if missing or result.unexpected_keys:
            raise MetricUnavailable(
                f"{source} is not a pytorch-fid Inception-v3 state dict: missing keys {missing[:5]}"
                f"{'...' if len(missing) > 5 else ''} ({len(missing)}), unexpected keys {result.unexpected_keys[:5]}"
                f"{'...' if len(result.unexpected_keys) > 5 else ''} ({len(result.unexpected_keys)}). "
                f"Expected the file '{INCEPTION_STATE_DICT_NAME}' or '{INCEPTION_TORCHSCRIPT_NAME}'."
            )

    # -- features ---------------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        for tensor in self.parameters():
            return tensor.device
        return torch.device("cpu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected (N, 3, H, W) images, got {tuple(x.shape)}")
        x = x.float()
        if self.backend == "torchscript":
            return self.torchscript(x, return_features=True).reshape(x.shape[0], -1)
        x = (x - 128.0) / 128.0
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                      self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)

    @torch.no_grad()
    def extract(self, images) -> np.ndarray:
        """The full clean pipeline: images (N, 3, H, W) in [-1, 1] (or uint8 0..255) -> uint8 -> PIL bicubic float
        resize to 299×299 -> features, returned as float64 (N, 2048). Usable directly as ``feature_fn`` of
        :func:`compute_fid`."""
        resized = clean_resize(quantize_images(images), self.input_size)
        x = torch.from_numpy(resized).to(self.device)
        return self(x).to("cpu", torch.float64).numpy()

    def fingerprint(self, **extra) -> dict:
        """What statistics computed with this extractor depend on (add resolution, image count, data, ...)."""
        return {"features": self.name, "resize": "clean-pil-bicubic-float", "input_size": self.input_size, **extra}
