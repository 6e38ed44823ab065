"""A synthetic, street-camera-like detection dataset written as real Pascal-VOC folders.

Called by :func:`fedplug.data.prepare_federation` when the config selects
``data=synthetic`` (the embedded default), and by tests and benchmarks that
need data without a download.  It writes one VOC folder per client ("camera"):

.. code-block:: text

    <root>/fedplug_synthetic.json            marker: the parameters the data was made with
    <root>/camera_00/Annotations/camera_00_00000.xml
    <root>/camera_00/JPEGImages/camera_00_00000.jpg
    <root>/camera_00/ImageSets/Main/train.txt
    <root>/camera_00/ImageSets/Main/test.txt
    <root>/camera_01/...

Design, so that a small detector learns it quickly and honestly:

- every class has its own shape *and* its own saturated colour (a wide red
  rectangle, a tall blue ellipse, a yellow triangle, ...); the background
  clutter (gradients, sensor noise, faint lines and blurred blobs) is grey and
  low in contrast, so it is never confusable with an object;
- 1-4 objects per image, longest side 16-48 px at 128 px (scaled with the image
  size), placed without overlap so every box is fully visible;
- each box is the exact bounding box of the pixels drawn for that object (read
  back from the object's mask), so the ground truth is tight to the pixel;
- non-IID across cameras: camera ``i`` draws classes from its own probability
  vector, dominated by class ``i mod K`` (see :func:`camera_class_probs`), and
  has its own background palette (a mild domain shift, as between real cameras).

Generation is deterministic for a seed, cached (a JSON marker records the
parameters; matching data is reused), atomic (written to a temporary folder
and renamed into place) and safe when several processes call it at once (an
exclusive lock file beside ``root`` serialises writers).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence
from xml.sax.saxutils import escape

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from fedplug.data.errors import DatasetError

# Bump when the rendering or the folder layout changes: cached data made by an
# older generator then no longer matches its marker and is regenerated.
GENERATOR_VERSION = 1
MARKER_NAME = "fedplug_synthetic.json"

CLASSES: tuple[str, ...] = ("car", "person", "sign")


@dataclass(frozen=True)
class ShapeStyle:
    """How one class is drawn: its shape, aspect ratio range and base colour."""

    shape: str  # rectangle | ellipse | triangle | diamond | circle
    aspect: tuple[float, float]  # width / height range
    rgb: tuple[int, int, int]


# Every class the generator can draw.  Shapes and colours are pairwise distinct,
# so class identity never hinges on a detail a tiny model cannot see.
SHAPES: dict[str, ShapeStyle] = {
    "car": ShapeStyle("rectangle", (1.5, 2.1), (215, 35, 35)),  # wide red box
    "person": ShapeStyle("ellipse", (0.36, 0.5), (35, 75, 225)),  # tall blue ellipse
    "sign": ShapeStyle("triangle", (0.95, 1.15), (240, 205, 25)),  # yellow triangle
    "bike": ShapeStyle("diamond", (0.9, 1.1), (30, 195, 45)),  # green diamond
    "light": ShapeStyle("circle", (1.0, 1.0), (205, 45, 205)),  # magenta disc
}

# Muted backgrounds, one per camera (cycled): (sky/top, road/bottom) colours.
_PALETTES: tuple[tuple[tuple[int, int, int], tuple[int, int, int]], ...] = (
    ((150, 150, 155), (95, 95, 100)),  # grey street
    ((165, 160, 145), (120, 112, 100)),  # beige pavement
    ((120, 125, 130), (65, 68, 72)),  # dark asphalt
    ((150, 158, 150), (100, 110, 100)),  # greenish park
    ((170, 170, 175), (135, 135, 140)),  # bright concrete
)

_MIN_SIDE, _MAX_SIDE = 16, 48  # longest side of an object at 128 px


def camera_class_probs(num_clients: int, num_classes: int, seed: int = 0, skew: float = 0.5) -> np.ndarray:
    """Each camera's class-probability vector, shape ``[num_clients, num_classes]``.

    Camera ``i`` puts ``skew`` of its mass on class ``i mod K`` and spreads the
    rest by a Dirichlet(2) draw, so mixes differ between cameras (non-IID) yet
    every class can appear everywhere.  ``skew=0`` gives IID-ish random mixes.
    """
    if not 0.0 <= skew <= 1.0:
        raise ValueError(f"class_skew must be in [0, 1], got {skew}")
    rng = np.random.default_rng([seed, 104_729])
    probs = np.empty((num_clients, num_classes))
    for i in range(num_clients):
        dominant = np.zeros(num_classes)
        dominant[i % num_classes] = 1.0
        probs[i] = skew * dominant + (1.0 - skew) * rng.dirichlet(np.full(num_classes, 2.0))
    return probs / probs.sum(axis=1, keepdims=True)


# ---------------------------------------------------------------------------
# Rendering one image
# ---------------------------------------------------------------------------


def _background(rng: np.random.Generator, size: int, palette) -> Image.Image:
    """Grey gradient + faint lines + faint blurred blobs: clutter that is not an object."""
    top = np.array(palette[0], float) + rng.uniform(-12, 12, 3).mean()
    bottom = np.array(palette[1], float) + rng.uniform(-12, 12, 3).mean()
    t = np.linspace(0.0, 1.0, size)[:, None, None]
    tilt = rng.uniform(-15, 15) * np.linspace(-0.5, 0.5, size)[None, :, None]
    img = (1 - t) * top + t * bottom + tilt
    img = np.broadcast_to(img, (size, size, 3)).astype(np.float32)
    base = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))

    # Blurred low-contrast blobs (shadows, puddles): grey, so never an object colour.
    blobs = Image.new("L", (size, size), 0)
    blob_draw = ImageDraw.Draw(blobs)
    for _ in range(rng.integers(2, 5)):
        cx, cy = rng.uniform(0, size, 2)
        rx, ry = rng.uniform(0.06, 0.22, 2) * size
        blob_draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=int(rng.integers(40, 90)))
    blobs = blobs.filter(ImageFilter.GaussianBlur(radius=size / 40))
    shade = Image.new("RGB", (size, size), tuple([int(rng.choice([40, 200]))] * 3))
    base = Image.composite(shade, base, blobs)

    # Thin faint lines (lane markings, poles, wires): grey, 1 px, low contrast.
    draw = ImageDraw.Draw(base)
    for _ in range(rng.integers(2, 6)):
        x0, y0, x1, y1 = rng.uniform(0, size, 4)
        grey = int(np.clip(img.mean() + rng.choice([-1, 1]) * rng.uniform(18, 35), 0, 255))
        draw.line([x0, y0, x1, y1], fill=(grey, grey, grey), width=1)
    return base


def _shape_mask(style: ShapeStyle, size: int, box: Sequence[float]) -> Image.Image:
    """A binary mask of one object drawn inside ``box`` (x0, y0, x1, y1 inclusive pixels)."""
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    x0, y0, x1, y1 = box
    if style.shape == "rectangle":
        draw.rectangle([x0, y0, x1, y1], fill=255)
    elif style.shape in ("ellipse", "circle"):
        draw.ellipse([x0, y0, x1, y1], fill=255)
    elif style.shape == "triangle":
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=255)
    elif style.shape == "diamond":
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=255)
    else:  # pragma: no cover - SHAPES only holds the shapes above
        raise ValueError(f"unknown shape {style.shape!r}")
    return mask


def _overlaps(box: Sequence[float], others: Sequence[Sequence[float]], margin: float) -> bool:
    return any(
        box[0] < o[2] + margin and o[0] < box[2] + margin and box[1] < o[3] + margin and o[1] < box[3] + margin
        for o in others
    )


def render_image(
    rng: np.random.Generator,
    class_probs: Sequence[float],
    classes: Sequence[str] = CLASSES,
    image_size: int = 128,
    palette=_PALETTES[0],
) -> tuple[Image.Image, np.ndarray, np.ndarray]:
    """Render one street-like image.

    :return: ``(image, boxes, labels)``: an RGB PIL image, boxes as float32
        ``[N, 4]`` continuous pixel coordinates ``x0, y0, x1, y1`` (``x1``/``y1``
        exclusive, i.e. the box covers pixel columns ``x0 .. x1-1``), and
        labels as int64 ``[N]`` in ``1..K`` (0 is background).
    """
    styles = [SHAPES[name] for name in classes]
    image = _background(rng, image_size, palette)
    scale = image_size / 128.0
    boxes: list[list[float]] = []
    labels: list[int] = []
    for _ in range(int(rng.integers(1, 5))):
        cls = int(rng.choice(len(classes), p=class_probs))
        style = styles[cls]
        for _attempt in range(30):
            side = rng.uniform(_MIN_SIDE, _MAX_SIDE) * scale
            aspect = rng.uniform(*style.aspect)
            w, h = (side, side / aspect) if aspect >= 1 else (side * aspect, side)
            x0 = rng.uniform(1, image_size - 2 - w)
            y0 = rng.uniform(1, image_size - 2 - h)
            draw_box = [round(x0), round(y0), round(x0 + w), round(y0 + h)]
            if not _overlaps(draw_box, boxes, margin=2):
                break
        else:
            continue  # crowded image: fewer objects rather than overlapping ones
        mask = _shape_mask(style, image_size, draw_box)
        tight = mask.getbbox()  # exclusive right/lower edge: continuous coordinates
        if tight is None:  # pragma: no cover - sizes >= 6 px always draw pixels
            continue
        colour = tuple(int(np.clip(c + rng.integers(-25, 26), 0, 255)) for c in style.rgb)
        image.paste(Image.new("RGB", (image_size, image_size), colour), (0, 0), mask)
        boxes.append([float(v) for v in tight])
        labels.append(cls + 1)

    # Sensor noise last, over objects and background alike; boxes are unaffected.
    pixels = np.asarray(image, dtype=np.float32)
    pixels += rng.normal(0.0, rng.uniform(3.0, 7.0), pixels.shape).astype(np.float32)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    return image, np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(labels, np.int64)


# ---------------------------------------------------------------------------
# Writing VOC folders
# ---------------------------------------------------------------------------


def voc_annotation_xml(
    folder: str, filename: str, width: int, height: int, boxes: np.ndarray, labels: np.ndarray, classes: Sequence[str]
) -> str:
    """A Pascal-VOC annotation for continuous ``x0, y0, x1, y1`` boxes.

    VOC stores 1-based, inclusive pixel indices: a box covering pixel columns
    ``x0 .. x1-1`` (0-based) is written ``xmin = x0 + 1``, ``xmax = x1``.
    :class:`fedplug.data.voc.VOCDetection` inverts exactly this.
    """
    objects = []
    for (x0, y0, x1, y1), label in zip(boxes.tolist(), labels.tolist()):
        objects.append(
            "  <object>\n"
            f"    <name>{escape(classes[label - 1])}</name>\n"
            "    <pose>Unspecified</pose>\n    <truncated>0</truncated>\n    <difficult>0</difficult>\n"
            "    <bndbox>\n"
            f"      <xmin>{int(x0) + 1}</xmin>\n      <ymin>{int(y0) + 1}</ymin>\n"
            f"      <xmax>{int(x1)}</xmax>\n      <ymax>{int(y1)}</ymax>\n"
            "    </bndbox>\n  </object>\n"
        )
    return (
        "<annotation>\n"
        f"  <folder>{escape(folder)}</folder>\n  <filename>{escape(filename)}</filename>\n"
        "  <source><database>fedplug synthetic street cameras</database></source>\n"
        f"  <size><width>{width}</width><height>{height}</height><depth>3</depth></size>\n"
        "  <segmented>0</segmented>\n" + "".join(objects) + "</annotation>\n"
    )


def client_names(num_clients: int) -> list[str]:
    """Folder names of the cameras, zero-padded so they sort in camera order."""
    width = max(2, len(str(num_clients - 1)))
    return [f"camera_{i:0{width}d}" for i in range(num_clients)]


def _write_client(
    folder: Path,
    name: str,
    probs: np.ndarray,
    palette,
    rng: np.random.Generator,
    train: int,
    test: int,
    image_size: int,
    classes: Sequence[str],
    image_format: str,
) -> None:
    annotations = folder / "Annotations"
    images = folder / "JPEGImages"
    splits = folder / "ImageSets" / "Main"
    for d in (annotations, images, splits):
        d.mkdir(parents=True)
    ids = [f"{name}_{i:05d}" for i in range(train + test)]
    for image_id in ids:
        image, boxes, labels = render_image(rng, probs, classes, image_size, palette)
        filename = f"{image_id}.{image_format}"
        if image_format == "jpg":
            # High quality: JPEG ringing must not blur the small objects' edges.
            image.save(images / filename, quality=92)
        else:
            image.save(images / filename)
        xml = voc_annotation_xml(name, filename, image_size, image_size, boxes, labels, classes)
        (annotations / f"{image_id}.xml").write_text(xml, encoding="utf-8")
    (splits / "train.txt").write_text("".join(i + "\n" for i in ids[:train]), encoding="utf-8")
    (splits / "test.txt").write_text("".join(i + "\n" for i in ids[train:]), encoding="utf-8")


@contextlib.contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if needed) across processes."""
    with open(path, "a+b") as handle:
        try:
            import fcntl
        except ImportError:  # Windows: lock one byte with msvcrt instead
            import msvcrt

            handle.seek(0)
            msvcrt.locking(handle.fileno(), msvcrt.LK_LOCK, 1)
            try:
                yield
            finally:
                handle.seek(0)
                msvcrt.locking(handle.fileno(), msvcrt.LK_UNLCK, 1)
        else:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _is_complete(root: Path, params: dict, names: Sequence[str]) -> bool:
    """True when ``root`` holds data made with exactly ``params`` and no camera folder is missing."""
    return _read_marker(root) == params and all(
        (root / n / "ImageSets" / "Main" / "train.txt").is_file() for n in names
    )


def _read_marker(root: Path) -> dict | None:
    try:
        return json.loads((root / MARKER_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def generate_synthetic_federation(
    root: str | os.PathLike,
    num_clients: int = 3,
    train_per_client: int = 48,
    test_per_client: int = 16,
    image_size: int = 128,
    seed: int = 0,
    classes: Sequence[str] = CLASSES,
    *,
    class_skew: float = 0.5,
    image_format: str = "jpg",
) -> list[Path]:
    """Write (or reuse) one VOC folder per camera under ``root``; return them in camera order.

    Deterministic for ``seed`` and the other parameters.  When ``root`` already
    holds data whose marker matches these parameters, nothing is written.
    Otherwise the whole federation is rendered into a temporary folder beside
    ``root`` and renamed into place, under an exclusive lock
    (``<root>.lock`` beside it), so concurrent callers never see half-written
    data and never render twice.

    :raises DatasetError: ``root`` exists, is not empty and was not written by
        this generator (it is never deleted), or a class has no drawing style.
    :raises ValueError: a count or size out of range.
    """
    classes = tuple(str(c) for c in classes)
    unknown = [c for c in classes if c not in SHAPES]
    if unknown:
        raise DatasetError(
            f"synthetic data cannot draw class(es) {unknown}: data.classes must be chosen from {sorted(SHAPES)}"
        )
    if len(set(classes)) != len(classes) or not classes:
        raise DatasetError(f"data.classes must be non-empty and unique, got {list(classes)}")
    if num_clients < 1 or train_per_client < 1 or test_per_client < 0:
        raise ValueError(
            f"need num_clients >= 1, train_per_client >= 1, test_per_client >= 0; got "
            f"{num_clients}, {train_per_client}, {test_per_client}"
        )
    if image_size < 64:
        raise ValueError(f"image_size must be >= 64 (objects are 16-48 px at 128), got {image_size}")
    if image_format not in ("jpg", "png"):
        raise ValueError(f"image_format must be 'jpg' or 'png', got {image_format!r}")

    root = Path(root).expanduser().absolute()
    params = {
        "generator": "fedplug.data.synthetic",
        "version": GENERATOR_VERSION,
        "num_clients": int(num_clients),
        "train_per_client": int(train_per_client),
        "test_per_client": int(test_per_client),
        "image_size": int(image_size),
        "seed": int(seed),
        "classes": list(classes),
        "class_skew": float(class_skew),
        "image_format": image_format,
    }
    names = client_names(num_clients)
    folders = [root / n for n in names]
    if _is_complete(root, params, names):
        return folders

    root.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(root.parent / f".{root.name}.lock"):
        if _is_complete(root, params, names):  # another process finished it while we waited
            return folders
        if root.exists() and any(root.iterdir()) and _read_marker(root) is None:
            raise DatasetError(
                f"{root} is not empty and holds no {MARKER_NAME}: it was not written by the synthetic "
                "generator, so it is left alone. Point data.root at an empty or new folder."
            )
        probs = camera_class_probs(num_clients, len(classes), seed, class_skew)
        streams = np.random.SeedSequence([seed, GENERATOR_VERSION]).spawn(num_clients)
        tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
        try:
            for i, name in enumerate(names):
                _write_client(
                    tmp / name,
                    name,
                    probs[i],
                    _PALETTES[i % len(_PALETTES)],
                    np.random.default_rng(streams[i]),
                    train_per_client,
                    test_per_client,
                    image_size,
                    classes,
                    image_format,
                )
            record = dict(params, class_probs=probs.round(4).tolist(), clients=names)
            (tmp / "summary.json").write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
            (tmp / MARKER_NAME).write_text(json.dumps(params, indent=1) + "\n", encoding="utf-8")
            if root.exists():
                old = root.parent / f".{root.name}.old-{uuid.uuid4().hex[:8]}"
                os.rename(root, old)
                os.rename(tmp, root)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(tmp, root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return folders
