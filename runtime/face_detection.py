"""The face detector that face restoration crops faces with: RetinaFace.

RetinaFace (Deng et al. 2019) as published by biubug6/Pytorch_Retinaface and
packaged by facexlib (both MIT-licensed), the detector A1111's GFPGAN and
CodeFormer paths use. The network is defined here in plain torch with the
same parameter names, so the published weight files load as they are
(`detection_mobilenet0.25_Final.pth`, `mobilenet0.25_Final.pth`,
`detection_Resnet50_Final.pth`, `Resnet50_Final.pth`, with or without their
`module.` prefix; or the same tensors as `.safetensors`). Which backbone a
file holds is read from its keys. `.pth` files load with torch's weights-only
unpickler.

    detect(model, image) -> [Face(box, landmarks, score)]   boxes/landmarks in image pixels

The files live in the models bucket under `facedetection/` (facexlib's
folder name) or `Codeformer/` / `GFPGAN/` beside the restorers, where A1111
keeps them; they are a `ModelKind` of the model store (`FACE_DETECTOR`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import product
from pathlib import Path
from typing import Any

from PIL import Image

from runtime.model_catalog import ModelEntry
from runtime.model_store import ModelKind
from sdeks.errors import ModelLoadError

FACE_DETECTOR_FOLDERS = ("facedetection/", "Codeformer/", "GFPGAN/")
#: facexlib's detector defaults (`detect_faces`): confidence and NMS thresholds.
CONFIDENCE = 0.8
NMS_IOU = 0.4
#: Faces at most: a hostile image full of "faces" costs bounded restorer work.
MAX_FACES = 32

_CONFIGS: dict[str, dict[str, Any]] = {
    "mobilenet0.25": {"in_channel": 32, "out_channel": 64},
    "resnet50": {"in_channel": 256, "out_channel": 256},
}
_MIN_SIZES = ((16, 32), (64, 128), (256, 512))
_STEPS = (8, 16, 32)
_VARIANCE = (0.1, 0.2)
#: BGR channel means the network was trained with (inputs are 0..255 minus these).
_MEAN_BGR = (104.0, 117.0, 123.0)


def _is_detector_file(entry: ModelEntry) -> bool:
    stem = entry.model_name.rsplit("/", 1)[-1].lower()
    return "retinaface" in stem or stem.startswith(("detection_", "mobilenet0.25", "resnet50"))


def build_retinaface(backbone: str = "mobilenet0.25") -> Any:
    """The network, random weights (for `load_state_dict` or tiny test models)."""
    import torch
    from torch import nn
    from torch.nn import functional as F
    from torchvision.models import resnet50
    from torchvision.models._utils import IntermediateLayerGetter

    def conv_bn(inp: int, oup: int, stride: int = 1, leaky: float = 0.0) -> nn.Sequential:
        return nn.Sequential(
            nn.Conv2d(inp, oup, 3, stride, 1, bias=False),
            nn.BatchNorm2d(oup),
            nn.LeakyReLU(negative_slope=leaky, inplace=True),
        )

    def conv_bn_no_relu(inp: int, oup: int, stride: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(inp, oup, 3, stride, 1, bias=False), nn.BatchNorm2d(oup))

    def conv_bn1x1(inp: int, oup: int, stride: int, leaky: float = 0.0) -> nn.Sequential:
        return nn.Sequential(
            nn.Conv2d(inp, oup, 1, stride, padding=0, bias=False),
            nn.BatchNorm2d(oup),
            nn.LeakyReLU(negative_slope=leaky, inplace=True),
        )

    def conv_dw(inp: int, oup: int, stride: int, leaky: float = 0.1) -> nn.Sequential:
        return nn.Sequential(
            nn.Conv2d(inp, inp, 3, stride, 1, groups=inp, bias=False),
            nn.BatchNorm2d(inp),
            nn.LeakyReLU(negative_slope=leaky, inplace=True),
            nn.Conv2d(inp, oup, 1, 1, 0, bias=False),
            nn.BatchNorm2d(oup),
            nn.LeakyReLU(negative_slope=leaky, inplace=True),
        )

    class MobileNetV1(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stage1 = nn.Sequential(
                conv_bn(3, 8, 2, leaky=0.1),
                conv_dw(8, 16, 1),
                conv_dw(16, 32, 2),
                conv_dw(32, 32, 1),
                conv_dw(32, 64, 2),
                conv_dw(64, 64, 1),
            )
            self.stage2 = nn.Sequential(
                conv_dw(64, 128, 2), *[conv_dw(128, 128, 1) for _ in range(5)]
            )
            self.stage3 = nn.Sequential(conv_dw(128, 256, 2), conv_dw(256, 256, 1))
            # Part of the published files (ImageNet head), unused by detection.
            self.avg = nn.AdaptiveAvgPool2d((1, 1))
            self.fc = nn.Linear(256, 1000)

    class SSH(nn.Module):
        def __init__(self, cin: int, cout: int) -> None:
            super().__init__()
            leaky = 0.1 if cout <= 64 else 0.0
            self.conv3X3 = conv_bn_no_relu(cin, cout // 2, 1)
            self.conv5X5_1 = conv_bn(cin, cout // 4, 1, leaky)
            self.conv5X5_2 = conv_bn_no_relu(cout // 4, cout // 4, 1)
            self.conv7X7_2 = conv_bn(cout // 4, cout // 4, 1, leaky)
            self.conv7x7_3 = conv_bn_no_relu(cout // 4, cout // 4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            c5_1 = self.conv5X5_1(x)
            out = torch.cat(
                [self.conv3X3(x), self.conv5X5_2(c5_1), self.conv7x7_3(self.conv7X7_2(c5_1))], 1
            )
            return F.relu(out)

    class FPN(nn.Module):
        def __init__(self, cins: list[int], cout: int) -> None:
            super().__init__()
            leaky = 0.1 if cout <= 64 else 0.0
            self.output1 = conv_bn1x1(cins[0], cout, 1, leaky)
            self.output2 = conv_bn1x1(cins[1], cout, 1, leaky)
            self.output3 = conv_bn1x1(cins[2], cout, 1, leaky)
            self.merge1 = conv_bn(cout, cout, leaky=leaky)
            self.merge2 = conv_bn(cout, cout, leaky=leaky)

        def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
            o1, o2, o3 = self.output1(feats[0]), self.output2(feats[1]), self.output3(feats[2])
            o2 = self.merge2(o2 + F.interpolate(o3, size=o2.shape[2:], mode="nearest"))
            o1 = self.merge1(o1 + F.interpolate(o2, size=o1.shape[2:], mode="nearest"))
            return [o1, o2, o3]

    class Head(nn.Module):
        def __init__(self, cin: int, per_anchor: int, anchors: int = 2) -> None:
            super().__init__()
            self.per_anchor = per_anchor
            self.conv1x1 = nn.Conv2d(cin, anchors * per_anchor, kernel_size=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = self.conv1x1(x).permute(0, 2, 3, 1).contiguous()
            return out.view(out.shape[0], -1, self.per_anchor)

    class RetinaFace(nn.Module):
        def __init__(self, name: str) -> None:
            super().__init__()
            cfg = _CONFIGS[name]
            if name == "resnet50":
                layers = {"layer2": 1, "layer3": 2, "layer4": 3}
                net: nn.Module = resnet50(weights=None)
            else:
                layers = {"stage1": 1, "stage2": 2, "stage3": 3}
                net = MobileNetV1()
            self.backbone_name = name
            self.body = IntermediateLayerGetter(net, layers)
            cin, cout = cfg["in_channel"], cfg["out_channel"]
            self.fpn = FPN([cin * 2, cin * 4, cin * 8], cout)
            self.ssh1, self.ssh2, self.ssh3 = SSH(cout, cout), SSH(cout, cout), SSH(cout, cout)
            self.ClassHead = nn.ModuleList([Head(cout, 2) for _ in range(3)])
            self.BboxHead = nn.ModuleList([Head(cout, 4) for _ in range(3)])
            self.LandmarkHead = nn.ModuleList([Head(cout, 10) for _ in range(3)])

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            fpn = self.fpn(list(self.body(x).values()))
            feats = [self.ssh1(fpn[0]), self.ssh2(fpn[1]), self.ssh3(fpn[2])]
            boxes = torch.cat([h(f) for h, f in zip(self.BboxHead, feats, strict=True)], 1)
            scores = torch.cat([h(f) for h, f in zip(self.ClassHead, feats, strict=True)], 1)
            marks = torch.cat([h(f) for h, f in zip(self.LandmarkHead, feats, strict=True)], 1)
            return boxes, F.softmax(scores, dim=-1), marks

    if backbone not in _CONFIGS:
        raise ValueError(f"backbone must be one of {sorted(_CONFIGS)}, got {backbone!r}")
    return RetinaFace(backbone).eval()


def load_face_detector(path: Path, entry: ModelEntry) -> Any:
    """A RetinaFace network from a published weight file (see the module docstring)."""
    import torch
    from safetensors.torch import load_file

    state: Any
    if path.suffix == ".safetensors":
        state = load_file(str(path))
    else:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if "body.stage1.0.0.weight" in state:
        backbone = "mobilenet0.25"
    elif "body.layer2.0.conv1.weight" in state:
        backbone = "resnet50"
    else:
        raise ModelLoadError(f"face detector {entry.name} is not a RetinaFace state dict")
    model = build_retinaface(backbone)
    # The ImageNet head is absent from some exports; the detection weights must all be there.
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("body.fc")]
    if missing or unexpected:
        raise ModelLoadError(
            f"face detector {entry.name}: {len(missing)} missing, {len(unexpected)} unexpected "
            f"tensors for RetinaFace {backbone} (e.g. {(missing or unexpected)[0]})"
        )
    return model.eval().requires_grad_(False)


FACE_DETECTOR = ModelKind(
    "face detector",
    folders=FACE_DETECTOR_FOLDERS,
    load=load_face_detector,
    suffixes=(".safetensors", ".pth"),
)


def detector_entries(entries: list[ModelEntry]) -> list[ModelEntry]:
    """The detector files among what the detector folders hold (restorers share them)."""
    return [e for e in entries if _is_detector_file(e)]


@dataclass(frozen=True)
class Face:
    #: (x0, y0, x1, y1) in image pixels.
    box: tuple[float, float, float, float]
    #: Five (x, y) points: left eye, right eye, nose, left and right mouth corner.
    landmarks: tuple[tuple[float, float], ...]
    score: float


def _priors(height: int, width: int) -> Any:
    import torch

    anchors: list[float] = []
    for step, sizes in zip(_STEPS, _MIN_SIZES, strict=True):
        rows, cols = math.ceil(height / step), math.ceil(width / step)
        for i, j in product(range(rows), range(cols)):
            for size in sizes:
                cx, cy = (j + 0.5) * step / width, (i + 0.5) * step / height
                anchors += [cx, cy, size / width, size / height]
    return torch.tensor(anchors).view(-1, 4)


def detect(
    model: Any,
    image: Image.Image,
    *,
    confidence: float = CONFIDENCE,
    nms_iou: float = NMS_IOU,
    max_faces: int = MAX_FACES,
) -> list[Face]:
    """Faces in `image`, best first (at most `max_faces`)."""
    import numpy as np
    import torch
    from torchvision.ops import nms

    param = next(model.parameters())
    bgr = np.asarray(image.convert("RGB"), dtype=np.float32)[:, :, ::-1] - np.array(_MEAN_BGR)
    x = torch.from_numpy(bgr.copy()).permute(2, 0, 1).unsqueeze(0)
    with torch.inference_mode():
        loc, conf, marks = model(x.to(device=param.device, dtype=param.dtype))
    loc, conf, marks = loc[0].float().cpu(), conf[0].float().cpu(), marks[0].float().cpu()
    priors = _priors(image.height, image.width)
    v0, v1 = _VARIANCE
    centers = priors[:, :2] + loc[:, :2] * v0 * priors[:, 2:]
    sizes = priors[:, 2:] * torch.exp(loc[:, 2:] * v1)
    boxes = torch.cat([centers - sizes / 2, centers + sizes / 2], 1)
    scale = torch.tensor([image.width, image.height] * 2, dtype=torch.float32)
    boxes = boxes * scale
    points = torch.cat(
        [priors[:, :2] + marks[:, 2 * k : 2 * k + 2] * v0 * priors[:, 2:] for k in range(5)], 1
    ) * torch.tensor([image.width, image.height] * 5, dtype=torch.float32)
    scores = conf[:, 1]
    keep = scores > confidence
    boxes, points, scores = boxes[keep], points[keep], scores[keep]
    order = nms(boxes, scores, nms_iou)[:max_faces]
    faces = []
    for i in order.tolist():
        pts = points[i].view(5, 2).tolist()
        faces.append(
            Face(
                box=tuple(boxes[i].tolist()),  # type: ignore[arg-type]
                landmarks=tuple((float(a), float(b)) for a, b in pts),
                score=float(scores[i]),
            )
        )
    return faces
