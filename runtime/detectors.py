"""ADetailer's detectors: find regions (faces, hands...) as boxes, from `adetailer/` in the bucket.

Licence: sdeks is Apache-2.0 and ultralytics (what the ADetailer extension
uses to run its YOLO `.pt` files) is AGPL-3.0, so the default path does not
use it. Two formats:

- `.pt2` (default, no extra package): a `torch.export` program of a YOLO-style
  detector. Input: one RGB image, float 0..1, `[1, 3, S, S]` with S in the
  file's `imgsz` extra file (default 640); output `[1, 4 + classes, N]`:
  box centre x, centre y, width, height in input pixels, then one score per
  class (YOLOv8's raw head layout). A YOLOv8 `.pt` becomes one with
  `torch.export` of the ultralytics model, once, where ultralytics is installed
  (docs/models.md).
- `.pt` (ultralytics): only with the optional `detector-ultralytics` extra
  installed (AGPL-3.0, opt-in by the operator); otherwise a clear
  `model_load_failed` naming the extra and the `.pt2` route.

Names: clients send the extension's names (`face_yolov8n.pt`), so a `.pt2`
is listed as the `.pt` it was exported from, and a request for `X.pt` takes
`adetailer/X.pt2` when there is one (it needs no extra package), else
`X.pt`, else whatever the catalog's naming rules find (`X`, `X [hash]`...).
A `.pt` that would need ultralytics where it is not installed is refused when
the request is checked, before any model work.

Boxes above the confidence are kept after non-maximum suppression
(torchvision's `nms`, IoU 0.7 as ultralytics' default).
"""

from __future__ import annotations

import importlib.util
import io
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from sdeks.errors import ModelLoadError, ModelNotFoundError
from sdeks.names import MODELS_DETECTOR_PREFIX

IOU = 0.7
DEFAULT_IMGSZ = 640


@dataclass(frozen=True)
class Detection:
    box: tuple[float, float, float, float]  # x1, y1, x2, y2 in image pixels
    score: float


@dataclass
class ExportedDetector:
    module: Any
    imgsz: int

    def __call__(self, image: Image.Image, confidence: float) -> list[Detection]:
        import torch
        from torchvision.ops import nms

        w, h = image.size
        size = self.imgsz
        pixels = np.asarray(image.convert("RGB").resize((size, size)), dtype=np.float32) / 255.0
        x = torch.from_numpy(pixels).permute(2, 0, 1)[None]
        with torch.inference_mode():
            out = self.module(x)
        out = out[0] if isinstance(out, list | tuple) else out
        pred = out[0].float()  # [4 + classes, N]
        scores, _ = pred[4:].max(dim=0)
        keep = scores >= confidence
        if not bool(keep.any()):
            return []
        cx, cy, bw, bh = pred[:4, keep]
        boxes = torch.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], dim=1)
        kept = nms(boxes, scores[keep], IOU)
        sx, sy = w / size, h / size
        found = []
        for i in kept.tolist():
            x1, y1, x2, y2 = boxes[i].tolist()
            box = (max(0.0, x1 * sx), max(0.0, y1 * sy), min(w, x2 * sx), min(h, y2 * sy))
            found.append(Detection(box, float(scores[keep][i])))
        return found


@dataclass
class UltralyticsDetector:
    model: Any

    def __call__(self, image: Image.Image, confidence: float) -> list[Detection]:
        pred = self.model(image, conf=confidence, verbose=False, device="cpu")
        boxes = pred[0].boxes
        return [
            Detection(tuple(b), float(s))  # type: ignore[arg-type]
            for b, s in zip(boxes.xyxy.cpu().tolist(), boxes.conf.cpu().tolist(), strict=True)
        ]


def load_detector(path: Path, entry: Any) -> Any:
    """A detector from a `.pt2` (torch.export) or, with the optional extra, a `.pt` file."""
    if path.suffix == ".pt":
        return _load_ultralytics(path, entry.name)
    import torch

    try:
        extra = {"imgsz": ""}
        program = torch.export.load(str(path), extra_files=extra)
        imgsz = int(extra["imgsz"] or DEFAULT_IMGSZ)
        return ExportedDetector(program.module(), imgsz)
    except (RuntimeError, ValueError, OSError, zipfile.BadZipFile, KeyError) as exc:
        raise ModelLoadError(
            f"cannot load detector {entry.name}: {type(exc).__name__}: {exc}"[:400]
        ) from exc


def _ultralytics_missing(name: str) -> ModelLoadError:
    return ModelLoadError(
        f"detector {name} is an ultralytics .pt file: install the optional "
        "`sdeks[detector-ultralytics]` extra (AGPL-3.0) on the runtime image, or upload it "
        "as a .pt2 torch.export program (docs/models.md)"
    )


def _load_ultralytics(path: Path, name: str) -> Any:
    try:
        from ultralytics import YOLO  # optional extra: AGPL-3.0
        from ultralytics.utils import SETTINGS
    except ImportError as exc:
        raise _ultralytics_missing(name) from exc
    SETTINGS.update({"sync": False})  # no telemetry or update checks from the pod
    return UltralyticsDetector(YOLO(str(path)))


def display_name(entry: Any) -> str:
    """What clients call a detector: the extension's `.pt` name, also for its `.pt2` export."""
    name = str(entry.name)
    return name[: -len(".pt2")] + ".pt" if name.endswith(".pt2") else name


def resolve_detector(models: Any, requested: str) -> Any:
    """The `adetailer/` entry an `ad_model` means (the module docstring's rules), checked
    loadable here: a `.pt` without ultralytics installed is a `ModelLoadError` now."""
    if not isinstance(requested, str) or not requested.strip():
        raise ModelNotFoundError(f"detector name must be a non-empty string, got {requested!r:.80}")
    wanted = requested.strip()
    entry = None
    if wanted.endswith(".pt"):
        exported = wanted + "2"
        entry = next((e for e in models.entries(DETECTOR) if e.name == exported), None)
    if entry is None:
        entry = models.resolve_weights(DETECTOR, wanted)
    if str(entry.name).endswith(".pt") and importlib.util.find_spec("ultralytics") is None:
        raise _ultralytics_missing(entry.name)
    return entry


def detector_kind() -> Any:
    """The model store's kind for `adetailer/`: detectors share the store's tiers and stay
    on the CPU (they are small, and ultralytics' `.to` is not a module copy)."""
    from runtime.model_store import ModelKind

    return ModelKind(
        "detector",
        folders=(MODELS_DETECTOR_PREFIX,),
        load=load_detector,
        suffixes=(".pt2", ".pt"),
        to_device=lambda obj, device, dtype: obj,
        size=lambda obj: _size(obj),
        display_name=display_name,
    )


def _size(obj: Any) -> int:
    module: Any = getattr(obj, "module", None) or getattr(obj, "model", None)
    state = getattr(module, "state_dict", None)
    if state is None:
        return 0
    return sum(t.numel() * t.element_size() for t in state().values())


DETECTOR = detector_kind()


# --- a tiny detector for tests and `make-tiny` --------------------------------


def save_tiny_detector(dest: Path, *, imgsz: int = 64) -> Path:
    """A `.pt2` detector that finds red regions: each 8x8 cell whose mean colour is red
    enough is a box twice the cell's size around its centre (class 0, "red").

    Not trained: a deterministic stand-in with the YOLO output layout, so the
    ADetailer path runs end to end offline.
    """
    import torch

    class RedCells(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.pool = torch.nn.AvgPool2d(8)
            self.register_buffer("weights", torch.tensor([1.0, -0.5, -0.5]).view(1, 3, 1, 1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            cells = self.pool(x)  # [1, 3, S/8, S/8]
            redness = (cells * self.weights).sum(dim=1)  # [1, S/8, S/8]
            n = redness.shape[-1]
            score = torch.sigmoid((redness - 0.35) * 40).flatten(1)
            idx = torch.arange(n * n, dtype=x.dtype)
            cx = (idx % n) * 8 + 4
            cy = torch.div(idx, n, rounding_mode="floor") * 8 + 4
            size = torch.full_like(cx, 16.0)
            boxes = torch.stack([cx, cy, size, size])[None]  # [1, 4, N]
            return torch.cat([boxes, score[:, None]], dim=1)  # [1, 5, N]

    program = torch.export.export(RedCells().eval(), (torch.zeros(1, 3, imgsz, imgsz),))
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.export.save(program, buf, extra_files={"imgsz": str(imgsz)})
    dest.write_bytes(buf.getvalue())
    return dest
