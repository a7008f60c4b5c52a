"""ControlNet preprocessors (`module`): turn the unit's image into the control map.

Names, aliases and slider defaults follow sd-webui-controlnet
(`scripts/processor.py`, `preprocessor_sliders_config`). Two kinds:

- weight-free (always available): `none`, `canny`, `invert`, `threshold`,
  `binary`, `blur_gaussian`, `tile_resample`, `scribble_xdog`,
  `lineart_standard`;
- model-based: run with controlnet_aux's annotators, whose weights come from
  `ControlNet/annotators/` in the models bucket (the file names of the
  lllyasviel/Annotators repository). Nothing is fetched from a hub: the files
  are handed to controlnet_aux as local paths.

`processor_res`, `threshold_a`, `threshold_b` outside a module's range (-1 is
the API's "unset") take the module's default, as the extension's bound check
does; the values used are written back into the unit for the infotext.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from sdeks.errors import InvalidParameterError, ModelLoadError, ModelNotFoundError
from sdeks.names import MODELS_ANNOTATOR_PREFIX


@dataclass(frozen=True)
class Slider:
    label: str
    value: float
    minimum: float
    maximum: float

    def pick(self, given: float) -> float:
        return given if self.minimum <= given <= self.maximum else self.value

    def detail(self) -> dict[str, Any]:
        return {"name": self.label, "value": self.value, "min": self.minimum, "max": self.maximum}


_RES = Slider("Preprocessor Resolution", 512, 64, 2048)

#: (image HWC uint8 RGB, resolution, threshold_a, threshold_b, annotator loader) -> map.
Run = Callable[[np.ndarray, int, float, float, "Callable[[], Any] | None"], np.ndarray]


@dataclass(frozen=True)
class Preprocessor:
    name: str
    run: Run
    resolution: Slider | None = _RES
    slider_1: Slider | None = None
    slider_2: Slider | None = None
    #: Annotator files it loads from `ControlNet/annotators/`; () = weight-free.
    weights: tuple[str, ...] = ()
    #: Builds the controlnet_aux annotator from local weight paths.
    loader: Callable[[list[Path]], Any] | None = None

    @property
    def model_free(self) -> bool:
        return not self.weights

    def detail(self) -> dict[str, Any]:
        sliders = [s.detail() for s in (self.resolution, self.slider_1, self.slider_2) if s]
        return {"model_free": self.model_free, "sliders": sliders}


# --- image helpers -------------------------------------------------------------


def hwc3(image: np.ndarray) -> np.ndarray:
    if image.ndim == 2:
        image = image[:, :, None]
    if image.shape[2] == 1:
        return np.concatenate([image] * 3, axis=2)
    return image[:, :, :3]


def resize_short_side(image: np.ndarray, resolution: int) -> np.ndarray:
    """The extension's `resize_image`: the short side becomes `resolution` (multiple of 64 kept
    loose: any size diffusers accepts is fine, the map is resized to the render size later)."""
    import cv2

    h, w = image.shape[:2]
    k = resolution / min(h, w)
    size = (max(1, round(w * k)), max(1, round(h * k)))
    interp = cv2.INTER_CUBIC if k > 1 else cv2.INTER_AREA
    return cv2.resize(image, size, interpolation=interp)


def _gray(image: np.ndarray) -> np.ndarray:
    import cv2

    return cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)


# --- weight-free modules ---------------------------------------------------------


def _none(img: np.ndarray, res: int, a: float, b: float, _: Any) -> np.ndarray:
    return img


def _invert(img: np.ndarray, res: int, a: float, b: float, _: Any) -> np.ndarray:
    return 255 - resize_short_side(img, res)


def _canny(img: np.ndarray, res: int, a: float, b: float, _: Any) -> np.ndarray:
    import cv2

    return hwc3(cv2.Canny(resize_short_side(img, res), int(a), int(b)))


def _threshold(img: np.ndarray, res: int, a: float, b: float, _: Any) -> np.ndarray:
    gray = _gray(resize_short_side(img, res))
    return hwc3(np.where(gray > a, 255, 0).astype(np.uint8))


def _binary(img: np.ndarray, res: int, a: float, b: float, _: Any) -> np.ndarray:
    import cv2

    gray = _gray(resize_short_side(img, res))
    if a == 0 or a == 255:  # the extension's "0 = Otsu"
        _, out = cv2.threshold(gray, 0, 255, cv2.THRESH_BINARY_INV + cv2.THRESH_OTSU)
    else:
        _, out = cv2.threshold(gray, a, 255, cv2.THRESH_BINARY_INV)
    return hwc3(out)


def _blur(img: np.ndarray, res: int, a: float, b: float, _: Any) -> np.ndarray:
    import cv2

    return cv2.GaussianBlur(resize_short_side(img, res), (0, 0), a)


def _tile(img: np.ndarray, res: int, a: float, b: float, _: Any) -> np.ndarray:
    import cv2

    if a <= 1.0:
        return img
    h, w = img.shape[:2]
    size = (max(1, int(w / a)), max(1, int(h / a)))
    return cv2.resize(img, size, interpolation=cv2.INTER_AREA)


def _xdog(img: np.ndarray, res: int, a: float, b: float, _: Any) -> np.ndarray:
    import cv2

    x = resize_short_side(img, res).astype(np.float32)
    g1 = cv2.GaussianBlur(x, (0, 0), 0.5)
    g2 = cv2.GaussianBlur(x, (0, 0), 5.0)
    dog = (255 - np.min(g2 - g1, axis=2)).clip(0, 255)
    out = np.zeros_like(dog, dtype=np.uint8)
    out[2 * (255 - dog) > a] = 255
    return hwc3(out)


def _lineart_standard(img: np.ndarray, res: int, a: float, b: float, _: Any) -> np.ndarray:
    detector = _aux("lineart_standard", "LineartStandardDetector")
    out = detector()(
        img, guassian_sigma=a, intensity_threshold=int(b), detect_resolution=res, output_type="np"
    )
    return hwc3(np.asarray(out))


# --- model-based modules (controlnet_aux) ------------------------------------------


def _aux(module: str, name: str) -> Any:
    """A controlnet_aux class; its package import warns about optional extras (mediapipe,
    timm registry names) that we never use, so those warnings are silenced here."""
    import importlib
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return getattr(importlib.import_module(f"controlnet_aux.{module}"), name)


def _annotated(**call: Any) -> Run:
    """A run function calling the loaded controlnet_aux annotator at the resolution."""

    def run(img: np.ndarray, res: int, a: float, b: float, load: Any) -> np.ndarray:
        annotator = load()
        kwargs = {k: (v(a, b) if callable(v) else v) for k, v in call.items()}
        out = annotator(
            img, detect_resolution=res, image_resolution=res, output_type="np", **kwargs
        )
        return hwc3(np.asarray(out))

    return run


def _load_hed(paths: list[Path]) -> Any:
    return _aux("hed", "HEDdetector").from_pretrained(str(paths[0].parent), filename=str(paths[0]))


def _load_pidi(paths: list[Path]) -> Any:
    return _aux("pidi", "PidiNetDetector").from_pretrained(
        str(paths[0].parent), filename=str(paths[0])
    )


def _load_lineart(paths: list[Path]) -> Any:
    return _aux("lineart", "LineartDetector").from_pretrained(
        str(paths[0].parent), filename=str(paths[0]), coarse_filename=str(paths[1])
    )


def _load_lineart_anime(paths: list[Path]) -> Any:
    return _aux("lineart_anime", "LineartAnimeDetector").from_pretrained(
        str(paths[0].parent), filename=str(paths[0])
    )


def _load_midas(paths: list[Path]) -> Any:
    return _aux("midas", "MidasDetector").from_pretrained(
        str(paths[0].parent), filename=str(paths[0])
    )


def _load_mlsd(paths: list[Path]) -> Any:
    return _aux("mlsd", "MLSDdetector").from_pretrained(
        str(paths[0].parent), filename=str(paths[0])
    )


def _load_openpose(paths: list[Path]) -> Any:
    return _aux("open_pose", "OpenposeDetector").from_pretrained(
        str(paths[0].parent),
        filename=str(paths[0]),
        hand_filename=str(paths[1]),
        face_filename=str(paths[2]),
    )


_POSE = ("body_pose_model.pth", "hand_pose_model.pth", "facenet.pth")
_LINEART = ("sk_model.pth", "sk_model2.pth")


def _openpose(hand: bool, face: bool) -> Run:
    return _annotated(include_body=True, include_hand=hand, include_face=face)


PREPROCESSORS: dict[str, Preprocessor] = {
    p.name: p
    for p in (
        Preprocessor("none", _none, resolution=None),
        Preprocessor("invert (from white bg & black line)", _invert),
        Preprocessor(
            "canny",
            _canny,
            slider_1=Slider("Canny Low Threshold", 100, 1, 255),
            slider_2=Slider("Canny High Threshold", 200, 1, 255),
        ),
        Preprocessor(
            "threshold", _threshold, slider_1=Slider("Binarization Threshold", 127, 0, 255)
        ),
        Preprocessor("binary", _binary, slider_1=Slider("Binary threshold", 0, 0, 255)),
        Preprocessor("blur_gaussian", _blur, slider_1=Slider("Sigma", 9.0, 0.01, 64.0)),
        Preprocessor(
            "tile_resample",
            _tile,
            resolution=None,
            slider_1=Slider("Down Sampling Rate", 1.0, 1.0, 8.0),
        ),
        Preprocessor("scribble_xdog", _xdog, slider_1=Slider("XDoG Threshold", 32, 1, 64)),
        Preprocessor(
            "lineart_standard (from white bg & black line)",
            _lineart_standard,
            slider_1=Slider("Gaussian Sigma", 6.0, 0.1, 32.0),
            slider_2=Slider("Intensity Threshold", 8, 0, 64),
        ),
        Preprocessor(
            "softedge_hed", _annotated(safe=False), weights=("ControlNetHED.pth",), loader=_load_hed
        ),
        Preprocessor(
            "softedge_hedsafe",
            _annotated(safe=True),
            weights=("ControlNetHED.pth",),
            loader=_load_hed,
        ),
        Preprocessor(
            "softedge_pidinet",
            _annotated(safe=False),
            weights=("table5_pidinet.pth",),
            loader=_load_pidi,
        ),
        Preprocessor(
            "softedge_pidisafe",
            _annotated(safe=True),
            weights=("table5_pidinet.pth",),
            loader=_load_pidi,
        ),
        Preprocessor(
            "lineart_realistic", _annotated(coarse=False), weights=_LINEART, loader=_load_lineart
        ),
        Preprocessor(
            "lineart_coarse", _annotated(coarse=True), weights=_LINEART, loader=_load_lineart
        ),
        Preprocessor(
            "lineart_anime", _annotated(), weights=("netG.pth",), loader=_load_lineart_anime
        ),
        Preprocessor(
            "depth_midas",
            _annotated(),
            weights=("dpt_hybrid-midas-501f0c75.pt",),
            loader=_load_midas,
        ),
        Preprocessor(
            "mlsd",
            _annotated(thr_v=lambda a, b: a, thr_d=lambda a, b: b),
            slider_1=Slider("MLSD Value Threshold", 0.1, 0.01, 2.0),
            slider_2=Slider("MLSD Distance Threshold", 0.1, 0.01, 20.0),
            weights=("mlsd_large_512_fp32.pth",),
            loader=_load_mlsd,
        ),
        Preprocessor("openpose", _openpose(False, False), weights=_POSE, loader=_load_openpose),
        Preprocessor("openpose_hand", _openpose(True, False), weights=_POSE, loader=_load_openpose),
        Preprocessor("openpose_face", _openpose(False, True), weights=_POSE, loader=_load_openpose),
        Preprocessor("openpose_full", _openpose(True, True), weights=_POSE, loader=_load_openpose),
    )
}

#: The extension's old and short names (`preprocessor_aliases`), accepted as `module`.
ALIASES = {
    "invert": "invert (from white bg & black line)",
    "lineart_standard": "lineart_standard (from white bg & black line)",
    "lineart": "lineart_realistic",
    "depth": "depth_midas",
    "hed": "softedge_hed",
    "hed_safe": "softedge_hedsafe",
    "pidinet": "softedge_pidinet",
    "pidinet_safe": "softedge_pidisafe",
    "tile": "tile_resample",
    "None": "none",
}


def get(module: str, where: str = "module") -> Preprocessor:
    """The preprocessor `module` names (name or alias); a clear error naming it otherwise."""
    name = ALIASES.get(module, module)
    found = PREPROCESSORS.get(name) or PREPROCESSORS.get(name.lower())
    if found is None:
        raise InvalidParameterError(
            f"`{where}` {module!r:.80}: no such ControlNet preprocessor (GET /controlnet/"
            f"module_list lists them: {', '.join(list(PREPROCESSORS)[:12])}, ...)"
        )
    return found


def module_list(alias_names: bool = False) -> list[str]:
    if not alias_names:
        return list(PREPROCESSORS)
    short = {v: k for k, v in ALIASES.items() if k != "None"}
    return [short.get(name, name) for name in PREPROCESSORS]


class Annotators:
    """Loaded controlnet_aux annotators, one per weight set, kept while the pod runs.

    `fetch(key)` puts a file of the models source on local disk (the model
    store's disk tier). A missing file fails naming the module and the key.
    """

    def __init__(self, fetch: Callable[[str], Path], device: str = "cpu") -> None:
        self._fetch = fetch
        self._device = device
        self._loaded: dict[tuple[str, ...], Any] = {}
        self._lock = threading.Lock()

    def loader(self, pre: Preprocessor) -> Callable[[], Any]:
        def load() -> Any:
            with self._lock:
                if pre.weights in self._loaded:
                    return self._loaded[pre.weights]
            paths = []
            for name in pre.weights:
                key = MODELS_ANNOTATOR_PREFIX + name
                try:
                    paths.append(self._fetch(key))
                except ModelNotFoundError as exc:
                    raise ModelNotFoundError(
                        f"ControlNet preprocessor {pre.name!r} needs its annotator weights "
                        f"{key} in the models bucket: {exc.message}"
                    ) from exc
            assert pre.loader is not None
            try:
                annotator = pre.loader(paths)
            except Exception as exc:
                # The files are the bucket's, read by third-party code: one of another
                # layout raises a bare KeyError in controlnet_aux (a missing tensor), a
                # truncated one whatever torch's unpickler meets (IndexError, EOFError,
                # UnpicklingError...). Any of them fails the task naming the files; the
                # pod keeps serving.
                names = ", ".join(MODELS_ANNOTATOR_PREFIX + n for n in pre.weights)
                raise ModelLoadError(
                    f"ControlNet preprocessor {pre.name!r}: its annotator weights ({names}) "
                    f"did not load: {type(exc).__name__}: {exc}"
                ) from exc
            if hasattr(annotator, "to"):
                annotator = annotator.to(self._device)
            with self._lock:
                self._loaded.setdefault(pre.weights, annotator)
                return self._loaded[pre.weights]

        return load


@dataclass(frozen=True)
class Detected:
    image: Image.Image
    processor_res: int
    threshold_a: float
    threshold_b: float


def detect(
    image: Image.Image,
    module: str,
    *,
    processor_res: float = -1,
    threshold_a: float = -1,
    threshold_b: float = -1,
    annotators: Annotators | None = None,
    where: str = "module",
) -> Detected:
    """Run `module` on `image`; the slider values actually used come back with the map."""
    pre = get(module, where)
    res = int(pre.resolution.pick(processor_res)) if pre.resolution else int(processor_res)
    a = pre.slider_1.pick(threshold_a) if pre.slider_1 else threshold_a
    b = pre.slider_2.pick(threshold_b) if pre.slider_2 else threshold_b
    load = None
    if pre.weights:
        if annotators is None:
            raise InvalidParameterError(
                f"`{where}` {module!r}: this runtime has no annotator weights source"
            )
        load = annotators.loader(pre)
    pixels = hwc3(np.asarray(image.convert("RGB"), dtype=np.uint8))
    out = pre.run(pixels, res if res > 0 else 512, a, b, load)
    return Detected(Image.fromarray(np.ascontiguousarray(out).astype(np.uint8)), res, a, b)
