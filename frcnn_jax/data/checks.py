"""Reading untrusted images and annotations: every problem becomes a counted, named `Problem`.

A dataset folder is user data: files go missing, images are truncated or huge, XML can carry
entity-expansion attacks. Readers here never let such a file crash a preparation or a training
run: they raise `BadExample(kind, detail)` for an example that must be skipped, and `Problems`
counts kinds and remembers the first offending files for a one-line summary.
"""

import collections
import io
import pathlib
import warnings

import numpy as np
from PIL import Image

# Largest image we agree to decode (pixels). A decompression bomb declares a huge size in a
# small file; it is refused from its header, before any pixel is decoded.
MAX_IMAGE_PIXELS = 64_000_000
JPEG_QUALITY = 92


class BadExample(Exception):
    """An example that must be skipped; `kind` is a short category for the summary."""

    def __init__(self, kind, detail):
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail


class Problems:
    """Counts of problems by kind, with the first few offending files of each kind."""

    def __init__(self, examples_per_kind=3):
        self.counts = collections.Counter()
        self.places = collections.Counter()  # how many add() calls (files) per kind
        self.examples = collections.defaultdict(list)
        self._keep = examples_per_kind

    def add(self, kind, where, count=1):
        self.counts[kind] += count
        self.places[kind] += 1
        if len(self.examples[kind]) < self._keep:
            self.examples[kind].append(str(where))

    def update(self, other):
        for kind, count in other.counts.items():
            self.counts[kind] += count
            self.places[kind] += other.places[kind]
            room = self._keep - len(self.examples[kind])
            self.examples[kind] += other.examples[kind][: max(room, 0)]

    def __bool__(self):
        return bool(self.counts)

    def summary(self):
        """'3 corrupt image (a.jpg, b.jpg, ...); 1 missing image (c.jpg)' or 'none'."""
        if not self.counts:
            return "none"
        parts = []
        for kind, count in sorted(self.counts.items()):
            names = self.examples[kind]
            more = ", ..." if self.places[kind] > len(names) else ""
            parts.append(f"{count} {kind} ({', '.join(names)}{more})")
        return "; ".join(parts)


def load_image(path, problems=None):
    """RGB uint8 [H, W, 3] and the bytes to store for it.

    The original file bytes are kept when the file is an RGB JPEG; any other mode (grayscale,
    CMYK, RGBA, palette) or format is converted to RGB and re-encoded as JPEG, counted in
    `problems` as "converted <mode> image".

    Raises:
      BadExample: missing file, not an image, truncated/corrupt data, or more than
        `MAX_IMAGE_PIXELS` pixels (refused before decoding).
    """
    path = pathlib.Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise BadExample("missing image", path.name) from None
    except OSError as e:
        raise BadExample("unreadable image", f"{path.name}: {e}") from None
    return decode_image_bytes(data, path.name, problems)


def decode_image_bytes(data, name, problems=None):
    """Like `load_image`, for encoded bytes; `name` names the file in messages."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > MAX_IMAGE_PIXELS:
                raise BadExample(
                    "oversized image",
                    f"{name} declares {width}x{height} pixels (limit {MAX_IMAGE_PIXELS})",
                )
            image.load()  # truncated files fail here
    except BadExample:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadExample("oversized image", f"{name}: {e}") from None
    except Exception as e:  # PIL raises many types for bad data
        raise BadExample("corrupt image", f"{name}: {type(e).__name__}: {e}") from None
    if width == 0 or height == 0:
        raise BadExample("corrupt image", f"{name}: empty {width}x{height} image")
    if image.mode == "RGB" and image.format == "JPEG":
        return np.asarray(image), data
    if problems is not None and image.mode != "RGB":
        problems.add(f"converted {image.mode} image", name)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        image = Image.new("RGB", rgba.size, (255, 255, 255))
        image.paste(rgba, mask=rgba.getchannel("A"))  # transparent pixels become white
    else:
        image = image.convert("RGB")
    return np.asarray(image), encode_jpeg(np.asarray(image))


def encode_jpeg(image):
    """uint8 [H, W, 3] -> JPEG bytes (PIL, deterministic for the same input)."""
    out = io.BytesIO()
    Image.fromarray(image).save(out, format="JPEG", quality=JPEG_QUALITY)
    return out.getvalue()


def clean_boxes(boxes, height, width, where, problems):
    """Clip pixel boxes (x1, y1, x2, y2) to the image and drop empty or inverted ones.

    Returns (kept boxes float32 [N', 4], keep bool [N]); each clip and drop is counted.
    """
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    clipped = boxes.copy()
    clipped[:, 0::2] = np.clip(boxes[:, 0::2], 0, width)
    clipped[:, 1::2] = np.clip(boxes[:, 1::2], 0, height)
    inverted = (boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])
    keep = (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1]) & ~inverted
    outside = ~keep & ~inverted
    moved = np.any(clipped != boxes, axis=1) & keep
    for kind, mask in [
        ("box clipped to the image", moved),
        ("zero-area or inverted box dropped", inverted),
        ("box outside the image dropped", outside),
    ]:
        if mask.any():
            problems.add(kind, where, int(mask.sum()))
    return clipped[keep], keep
