"""Small inline PNGs of stored adversarial examples: clean, adversarial and the perturbation,
as data URIs (the report stays one folder of static files)."""

from __future__ import annotations

import base64
import struct
import zlib

import numpy as np


def png(pixels: np.ndarray) -> bytes:
    """PNG bytes of an H×W (grey) or H×W×3 (RGB) uint8 image."""
    if pixels.ndim == 2:
        pixels, colour = pixels[:, :, None], 0
    else:
        colour = 2
    height, width, _ = pixels.shape
    raw = b"".join(b"\x00" + row.tobytes() for row in np.ascontiguousarray(pixels, dtype=np.uint8))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, colour, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def data_uri(image: np.ndarray) -> str:
    """A data URI of a C×H×W float image in [0, 1] (C = 1 or 3)."""
    hwc = np.clip(np.round(np.moveaxis(image, 0, -1) * 255), 0, 255).astype(np.uint8)
    return "data:image/png;base64," + base64.b64encode(png(hwc[:, :, 0] if hwc.shape[2] == 1 else hwc)).decode()


def triplet(clean: bytes, adversarial: bytes, shape: tuple[int, int, int], eps: float, norm: str) -> dict:
    """Data URIs of the clean image, the adversarial one and their difference, the difference
    mapped from [−eps, eps] (L∞) or its own largest magnitude (other norms) to black–white around
    mid grey."""
    x = np.frombuffer(clean, np.float16).astype(np.float32).reshape(shape)
    x_adv = np.frombuffer(adversarial, np.float16).astype(np.float32).reshape(shape)
    delta = x_adv - x
    scale = eps if norm == "Linf" else float(np.abs(delta).max()) or 1.0
    return {"clean": data_uri(x), "adversarial": data_uri(x_adv), "perturbation": data_uri(0.5 + delta / (2 * scale)),
            "max_change": float(np.abs(delta).max())}
