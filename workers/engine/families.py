"""Per-family image limits: bound how many tokens one picture can become, whatever its size.

Decided from what the loaded image processor has, never from a model name:

* dynamic resolution (Qwen2-VL, Qwen2.5-VL and kin): the image processor has ``patch_size`` and
  ``merge_size`` and a pixel range (``size["shortest_edge"/"longest_edge"]`` in transformers 5,
  ``min_pixels``/``max_pixels`` before). One image token covers ``(patch_size * merge_size)²``
  pixels, so the pixel range is set from tuwen's token limits. Huge pictures are scaled down first.
* fixed resolution (LLaVA-1.5) and tiles (LLaVA-NeXT, at most its largest ``image_grid_pinpoints``
  grid): already bounded by the checkpoint, left as they are. The pinpoints must not be trimmed here:
  the model splits its features with the pinpoints in its own config, so processor and model would
  disagree on the number of image tokens.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

log = logging.getLogger(__name__)


class ImageLimits(Protocol):
    """The two settings this module reads (``Settings`` has them; tests may pass any object)."""

    #: At most this many image tokens per picture; caps the checkpoint's own limit, never raises it.
    max_image_tokens: int
    #: At least this many (small pictures are scaled up); 0 keeps the checkpoint's own minimum. Clipped
    #: to half the maximum: scaling up rounds each side up, which must not overshoot the maximum.
    min_image_tokens: int


def pixels_per_token(image_processor: Any) -> int | None:
    """Pixels one image token covers for a dynamic-resolution image processor, else None."""
    patch, merge = getattr(image_processor, "patch_size", None), getattr(image_processor, "merge_size", None)
    if not isinstance(patch, int) or not isinstance(merge, int) or _pixel_range(image_processor) is None:
        return None
    return (patch * merge) ** 2


def apply_image_limits(processor: Any, settings: ImageLimits) -> None:
    """Bound the image tokens per picture on a freshly loaded processor (in place)."""
    image_processor = getattr(processor, "image_processor", None)
    unit = pixels_per_token(image_processor)
    pixel_range = _pixel_range(image_processor)
    if unit is None or pixel_range is None:
        return
    low, high = pixel_range
    most = min(high // unit, settings.max_image_tokens) if high else settings.max_image_tokens
    fewest = settings.min_image_tokens or (low // unit if low else 1)
    fewest = max(1, min(fewest, most // 2))
    _set_pixel_range(image_processor, fewest * unit, most * unit)
    log.info("image tokens per picture: %d to %d (%d pixels each)", fewest, most, unit)


def _pixel_range(image_processor: Any) -> tuple[int | None, int | None] | None:
    """(min, max) pixels from ``size`` (transformers 5) or ``min_pixels``/``max_pixels`` (4.x)."""
    size = _as_dict(getattr(image_processor, "size", None))
    if "longest_edge" in size and "shortest_edge" in size:
        return size["shortest_edge"], size["longest_edge"]
    if getattr(image_processor, "max_pixels", None) is not None:
        return getattr(image_processor, "min_pixels", None), image_processor.max_pixels
    return None


def _set_pixel_range(image_processor: Any, low: int, high: int) -> None:
    """Write the range everywhere this transformers version may read it from."""
    size = getattr(image_processor, "size", None)
    values = _as_dict(size)
    if values:
        for low_key, high_key in (("shortest_edge", "longest_edge"), ("min_pixels", "max_pixels")):
            if high_key in values:
                values.update({low_key: low, high_key: high})
        image_processor.size = values if isinstance(size, dict) else type(size)(**values)
    for name, value in (("min_pixels", low), ("max_pixels", high)):
        if getattr(image_processor, name, None) is not None:
            setattr(image_processor, name, value)


def _as_dict(size: Any) -> dict[str, Any]:
    """A size given as a dict or a transformers ``SizeDict`` (a dataclass), without unset keys."""
    if size is None or isinstance(size, (int, tuple, list)):
        return {}
    items = size.items() if isinstance(size, dict) else vars(size).items()
    return {k: v for k, v in items if v is not None}


#: Most pictures one job may carry, per family: what the family was trained to read together. LLaVA-1.5
#: and LLaVA-NeXT see one picture per turn in training but read a few in one prompt; the Qwen-VL
#: families take several by design (each costs its own image tokens, bounded by the context).
MAX_IMAGES = {"llava": 4, "llava_next": 4, "qwen2_vl": 8, "qwen2_5_vl": 8}


def family_max_images(config: Any) -> int:
    """Most pictures per job for a loaded model's config (1 for a family tuwen has not measured)."""
    return MAX_IMAGES.get(getattr(config, "model_type", ""), 1)


def picture_side(processor: Any) -> int | None:
    """The long side, in pixels, the loaded image processor brings a picture to: what a PDF page is best
    rendered at (announced to the gateway and the bulk submitter). Read from what the processor has:
    dynamic resolution, the side of a square of its most pixels; tiles (``image_grid_pinpoints``), the
    largest grid's long side; a fixed size, its crop or resize size. None when it says none of these."""
    image_processor = getattr(processor, "image_processor", None)
    if image_processor is None:
        return None
    pixel_range = _pixel_range(image_processor)
    if pixels_per_token(image_processor) is not None and pixel_range is not None and pixel_range[1]:
        return int(pixel_range[1] ** 0.5)
    pinpoints = getattr(image_processor, "image_grid_pinpoints", None)
    if pinpoints:
        return max(max(int(x) for x in point) for point in pinpoints)
    for name in ("crop_size", "size"):
        size = _as_dict(getattr(image_processor, name, None))
        sides = [int(size[k]) for k in ("height", "width", "shortest_edge", "longest_edge") if size.get(k)]
        if sides:
            return max(sides)
    return None
